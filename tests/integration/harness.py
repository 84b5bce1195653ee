"""Helpers for the integration tests: run the real `hostsvc run` (real nginx, real
gunicorn) on a free loopback port in a tmp runtime dir, talk HTTP to it, and check with
/proc scans (no psutil) that nothing it started lives on.

Test modules import these from `harness` (a name no other conftest shares); conftest.py
only turns `Service` into the `hostsvc` fixture.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable


TEST_APPS = Path(__file__).resolve().parent / "apps"
READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = READY_TIMEOUT,
             what: str = "condition") -> Any:
    """Poll `predicate` until truthy (generous timeouts only; no timing assertions)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, starttime) of a live pid from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    return int(fields[1]), fields[0].decode(), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: starttime} for every live descendant of `root` (a /proc scan, no psutil)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st and st[1] != "Z":
                table[int(entry)] = (st[0], st[2])
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def survivors(pids: dict[int, int]) -> list[int]:
    """Those of `pids` still alive (same start time, so a reused pid does not count)."""
    alive = []
    for pid, start in pids.items():
        st = proc_stat(pid)
        if st and st[1] != "Z" and st[2] == start:
            alive.append(pid)
    return alive


def fill(text: str, port: int) -> str:
    """Dedent a config and fill in `{port}` and `{apps}` (tests/integration/apps)."""
    return textwrap.dedent(text).lstrip("\n").replace("{port}", str(port)) \
        .replace("{apps}", str(TEST_APPS))


class Service:
    """One `hostsvc run` under test."""

    def __init__(self, workdir: Path, config_text: str | None, watch: bool = False,
                 config_name: str = "hostsvc.yaml", port: int | None = None,
                 engine: str | None = None) -> None:
        self.workdir = workdir
        self.engine = engine
        self.port = port or free_port()
        # The metrics listener's default ($HOSTSVC_METRICS_LISTEN): a free port per
        # service, so tests (and anyone else's run) never share 9090.
        self.metrics_port = free_port()
        self.runtime_dir = workdir / "run"
        self.config_path = workdir / config_name
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        if config_text is not None:       # None: the test laid out the file itself
            self.write_config(config_text)
        cmd = [sys.executable, "-m", "hostsvc", "run", str(self.config_path),
               "--runtime-dir", str(self.runtime_dir)] + (["--watch"] if watch else [])
        env = dict(os.environ, HOSTSVC_METRICS_LISTEN=f"127.0.0.1:{self.metrics_port}")
        self.proc = subprocess.Popen(cmd, stdout=self.stdout_path.open("wb"),
                                     stderr=self.stderr_path.open("wb"),
                                     stdin=subprocess.DEVNULL, cwd=workdir, env=env)
        self.known_pids: dict[int, int] = {}

    def write_config(self, text: str, path: Path | None = None) -> None:
        """Write a config; `{port}` and `{apps}` are filled in, and the service's engine
        becomes the default of every app (a top-level key, last so no line moves)."""
        text = fill(text, self.port).replace("{metrics_port}", str(self.metrics_port))
        if self.engine:
            text = text.rstrip("\n") + f"\nengine: {self.engine}\n"
        target = path or self.config_path
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)

    # -- observation -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.runtime_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def remember_pids(self) -> dict[int, int]:
        """Everything the supervisor runs now (arbiters, workers, nginx and its workers)."""
        self.known_pids.update(descendants(self.proc.pid))
        return self.known_pids

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"hostsvc exited with {self.proc.returncode}:\n"
                                     + self.stderr())
            st = self.state()
            return bool(st.get("nginx", {}).get("state") == "running" and all(
                a["state"] != "starting" for a in st.get("apps", {}).values()))
        wait_for(ready, what="hostsvc to start")
        self.remember_pids()

    # -- requests ----------------------------------------------------------------------------
    def request(self, path: str, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None, port: int | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def metrics_request(self, path: str, headers: dict[str, str] | None = None
                        ) -> tuple[int, dict[str, str], bytes]:
        """A request to the supervisor's metrics listener (/metrics, /healthz, /readyz)."""
        return self.request(path, headers=headers, port=self.metrics_port)

    def get_json(self, path: str) -> dict[str, Any]:
        status, _, body = self.request(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def slow_request(self, seconds: float) -> Callable[[], tuple[int, dict[str, str], bytes]]:
        """Start a GET to /echo/ that sleeps `seconds` in the app; return once the app has
        it (echo touches a marker file) with a function that waits for the response."""
        marker = self.workdir / f"slow-{time.monotonic_ns()}"
        result: dict[str, Any] = {}

        def send() -> None:
            try:
                result["response"] = self.request(f"/echo/?sleep={seconds}&touch={marker}")
            except Exception as exc:  # noqa: BLE001 - reported by the waiter below
                result["error"] = exc

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        wait_for(marker.exists, what="the slow request to reach the app")

        def response() -> tuple[int, dict[str, str], bytes]:
            thread.join(60)
            if "error" in result:
                raise AssertionError(f"the slow request failed: {result['error']!r}")
            return result["response"]
        return response

    # -- stopping ------------------------------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.remember_pids()
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def compose(*parts: str) -> str:
    """Join config fragments written at different indentations."""
    return "".join(textwrap.dedent(p).lstrip("\n") for p in parts)


BASIC_CONFIG = """
    listen: 127.0.0.1:{port}
    python_path: [{apps}]
    grace_period: 10
    apps:
      - name: echo
        wsgi: echo:app
        env: {GREETING: hello}
        graceful_timeout: 5
      - name: hello
        root: tree:Root
        workers: 1
        graceful_timeout: 5
"""
