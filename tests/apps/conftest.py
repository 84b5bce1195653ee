"""Example apps import the way hostsvc imports them: apps/ on the import path.

The `stack` fixture runs the real `hostsvc run config/hostsvc.yaml` (real nginx, gunicorn
and metrics server) once for the test session, with the integration tests' harness.
"""
import os
import signal
import sys
from pathlib import Path

import pytest

from support.paths import DEFAULT_CONFIG as CONFIG
from support.paths import REPO as ROOT

APPS = str(ROOT / "apps")
if APPS not in sys.path:
    sys.path.insert(0, APPS)
INTEGRATION = str(ROOT / "tests" / "integration")
if INTEGRATION not in sys.path:      # the harness module of tests/integration, reused
    sys.path.insert(0, INTEGRATION)

from harness import Service, free_port, survivors, wait_for  # noqa: E402


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The default config served on free loopback ports, with a tmp runtime dir and a
    tmp HOSTSVC_DATA_DIR. Yields the harness `Service` (`.port`, `.request()`,
    `.state()`, `.metrics_port`); at teardown every process it ran must be gone."""
    workdir = tmp_path_factory.mktemp("stack")
    port = free_port()                  # (the harness picks the metrics port itself)
    env = {"HOSTSVC_LISTEN": f"127.0.0.1:{port}",
           "HOSTSVC_DATA_DIR": str(workdir / "data"),
           # Service passes --runtime-dir WORKDIR/run; the status app learns it from here.
           "HOSTSVC_RUNTIME_DIR": str(workdir / "run")}
    # Only the child gets these: set them around the start, not for the whole session.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        svc = Service(workdir, None, config_name=str(CONFIG), port=port)
    svc.data_dir = workdir / "data"
    _running.append(svc)
    try:
        svc.wait_ready()
        wait_for(lambda: all(a["state"] == "running" and a["workers_alive"] == a["workers"]
                             for a in svc.state()["apps"].values()),
                 what="every app of the default config to run all its workers")
        yield svc
    finally:
        shut_down()


_running: list = []


def shut_down() -> None:
    """Stop the stack; every process it ran must exit (idempotent)."""
    while _running:
        svc = _running.pop()
        svc.stop()
        try:
            wait_for(lambda: not survivors(svc.known_pids), timeout=30,
                     what="every process of the stack to exit")
        finally:
            for pid in survivors(svc.known_pids):   # only after a failure: leave nothing
                os.kill(pid, signal.SIGKILL)


def pytest_runtest_teardown(item, nextitem):
    """The stack is session-scoped (test_stack and the browser test share one start), but
    stops after the last test of tests/apps instead of idling through the rest of a run."""
    if nextitem is None or Path(str(nextitem.path)).parent != Path(__file__).parent:
        shut_down()
