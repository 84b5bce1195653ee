"""The `hostsvc` fixture: start real services, stop them, and leave no process behind.

Every test that uses it runs once per pool engine (issue #7: everything the supervisor
promises holds for both): the config gets a top-level `engine:` line. A test of a
setting only one engine has says so with `@pytest.mark.engines("gunicorn")`.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from harness import Service, survivors, wait_for


ENGINES = ("gunicorn", "granian")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The pool engine of this run of the test."""
    marker = request.node.get_closest_marker("engines")
    if marker and request.param not in marker.args:
        pytest.skip(f"only on engine {' or '.join(marker.args)}")
    return request.param


@pytest.fixture
def hostsvc(tmp_path: Path, engine: str):
    """Factory: `svc = hostsvc(CONFIG_TEXT)` starts a service and waits until it is ready.

    At teardown every service is stopped and every process it ever ran must be gone.
    """
    started: list[Service] = []

    def start(config_text: str | None, watch: bool = False, wait: bool = True,
              config_name: str = "hostsvc.yaml", port: int | None = None) -> Service:
        svc = Service(tmp_path, config_text, watch=watch, config_name=config_name, port=port,
                      engine=engine)
        started.append(svc)
        if wait:
            svc.wait_ready()
        return svc

    yield start
    for svc in started:
        svc.stop()
        try:
            wait_for(lambda: not survivors(svc.known_pids), timeout=30,
                     what=f"every process of {svc.config_path.name} to exit")
        finally:
            for pid in survivors(svc.known_pids):   # only after a failure: leave nothing
                os.kill(pid, signal.SIGKILL)
