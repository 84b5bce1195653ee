"""Reloads: blue/green replacement with requests flowing and none failing, added and
removed apps, a reload that fails validation changing nothing, and --watch following a
Kubernetes-ConfigMap-style symlink swap."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import fill, free_port, survivors, wait_for

CONFIG = """
    listen: 127.0.0.1:{port}
    python_path: [{apps}]
    grace_period: 10
    apps:
      - name: echo
        wsgi: echo:app
        env: {GREETING: %s}
        graceful_timeout: 5
      - name: hello
        root: tree:Root
        workers: 1
      - name: %s
        wsgi: echo:app
        workers: 1
"""


class Traffic(threading.Thread):
    """Sequential keep-alive GETs, as a browser would send them.

    A request on a *reused idle* connection that nginx closed at the same moment (what an
    nginx reload does to idle keep-alive connections; see shared/field-notes.md) gets a
    reset or an empty reply: like browsers and most HTTP clients, this client retries such
    an idempotent request once on a new connection and counts it in `resets`. Everything
    else (an error on a fresh connection, any non-200 status) is a failure.
    """

    def __init__(self, port: int, path: str, limit: float = 120) -> None:
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.deadline = time.monotonic() + limit       # bounded: it stops by itself
        self.stopping = threading.Event()
        self.ok = 0
        self.resets = 0
        self.failures: list[str] = []
        self.greetings: list[str] = []

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            fresh = conn is None
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
            except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError) as e:
                conn.close()
                conn = None
                if fresh:
                    self.failures.append(f"fresh connection: {e!r}")
                else:
                    self.resets += 1
                continue
            except Exception as e:  # noqa: BLE001 - every other error is a failure
                self.failures.append(repr(e))
                conn.close()
                conn = None
                continue
            if resp.status != 200:
                self.failures.append(f"{resp.status} {body[:100]!r}")
            else:
                self.ok += 1
                if body.startswith(b"{"):
                    greeting = json.loads(body)["greeting"]
                    if not self.greetings or self.greetings[-1] != greeting:
                        self.greetings.append(greeting)
            if resp.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def hostsvc_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostsvc", *args], capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("threads", [1, 4], ids=["sync", "gthread-keepalive"])
def test_reload_replaces_adds_and_removes_apps_without_failing_a_request(hostsvc,
                                                                        threads: int) -> None:
    # gthread pools also get nginx upstream keep-alive connections, which the old nginx
    # workers hold to the old pool until they exit.
    config = CONFIG.replace("graceful_timeout: 5",
                            f"graceful_timeout: 5\n        threads: {threads}")
    svc = hostsvc(config % ("hello", "legacy"))
    before = svc.state()["apps"]
    assert svc.request("/legacy/")[0] == 200
    echo_traffic = Traffic(svc.port, "/echo/")
    tree_traffic = Traffic(svc.port, "/hello/item/1")
    echo_traffic.start()
    tree_traffic.start()
    try:
        wait_for(lambda: echo_traffic.ok > 20 and tree_traffic.ok > 20, what="traffic")
        svc.write_config(config % ("bonjour", "fresh"))
        out = hostsvc_cli("reload", str(svc.config_path), "--runtime-dir", str(svc.runtime_dir))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "reload ok: added: fresh; replaced: echo; removed: legacy" in out.stdout
        seen = echo_traffic.ok
        wait_for(lambda: echo_traffic.ok > seen + 20, what="traffic after the reload")
    finally:
        echo_traffic.stop()
        tree_traffic.stop()
    print(f"\nreload under traffic: {echo_traffic.ok + tree_traffic.ok} ok, "
          f"{echo_traffic.resets + tree_traffic.resets} idle keep-alive resets retried, "
          f"{len(echo_traffic.failures) + len(tree_traffic.failures)} failed")
    assert echo_traffic.failures == [] and tree_traffic.failures == []
    # Every request before the switch saw the old app, every one after it the new app.
    assert echo_traffic.greetings == ["hello", "bonjour"]

    after = svc.state()["apps"]
    assert after["echo"]["pid"] != before["echo"]["pid"]
    assert after["echo"]["generation"] == 2 and after["echo"]["socket"].endswith("echo.2.sock")
    assert after["hello"]["pid"] == before["hello"]["pid"]          # unchanged: untouched
    assert set(after) == {"echo", "hello", "fresh"}
    assert svc.request("/legacy/")[0] == 404
    assert svc.get_json("/fresh/")["app"] == "fresh"
    old_pids = {before["echo"]["pid"]: 0, before["legacy"]["pid"]: 0}
    old_pids = {pid: start for pid, start in svc.known_pids.items() if pid in old_pids}
    wait_for(lambda: not survivors(old_pids), what="the old echo and legacy arbiters to stop")
    assert svc.state()["last_reload"]["ok"] is True
    assert svc.state()["reloads"]["ok"] == 1 and svc.state()["reloads"]["failed"] == 0
    assert f"app=echo pid={before['echo']['pid']} event=stopping" in svc.stderr()


def test_a_reload_that_fails_validation_changes_nothing(hostsvc) -> None:
    svc = hostsvc(CONFIG % ("hello", "legacy"))
    before = svc.state()["apps"]
    broken = (CONFIG % ("hello", "legacy")).replace("workers: 1\n      - name: legacy",
                                                      "workers: two\n      - name: legacy")
    svc.write_config(broken)
    line = fill(broken, svc.port).splitlines().index("    workers: two") + 1

    # The CLI validates first and never disturbs the supervisor with a broken file.
    out = hostsvc_cli("reload", str(svc.config_path), "--runtime-dir", str(svc.runtime_dir))
    assert out.returncode == 1
    assert f"{svc.config_path}:{line}: apps[1].workers: expected a positive integer, " \
           f"got 'two'" in out.stderr
    assert svc.state()["last_reload"] is None

    # A plain SIGHUP with the broken file: logged and recorded, nothing changes.
    os.kill(svc.proc.pid, signal.SIGHUP)
    last = wait_for(lambda: svc.state()["last_reload"], what="the reload result")
    assert last["ok"] is False and f":{line}: apps[1].workers" in last["message"]
    assert f"{svc.config_path}:{line}: apps[1].workers" in svc.stderr()

    # An app that no longer imports fails validation as well.
    svc.write_config(CONFIG.replace("echo:app\n        env", "echo:missing\n        env")
                     % ("bonjour", "legacy"))
    os.kill(svc.proc.pid, signal.SIGHUP)
    last = wait_for(lambda: (r := svc.state()["last_reload"]) and "missing" in r["message"]
                    and r, what="the second reload result")
    assert last["ok"] is False and "has no attribute 'missing'" in last["message"]
    assert svc.state()["reloads"] == {"ok": 0, "failed": 2, "last_success": None}

    after = svc.state()["apps"]
    assert {n: a["pid"] for n, a in after.items()} == {n: a["pid"] for n, a in before.items()}
    assert svc.get_json("/echo/")["greeting"] == "hello"
    assert svc.request("/legacy/")[0] == 200


def test_watch_follows_a_configmap_style_symlink_swap(hostsvc, tmp_path: Path) -> None:
    # kubelet's layout: hostsvc.yaml -> ..data/hostsvc.yaml, ..data -> ..v1 (a dir);
    # an update writes ..v2 and atomically renames a new ..data symlink over the old one.
    port = free_port()
    cm = tmp_path / "cm"
    (cm / "..v1").mkdir(parents=True)
    (cm / "..v1" / "hostsvc.yaml").write_text(fill(CONFIG % ("hello", "legacy"), port))
    (cm / "..data").symlink_to("..v1")
    (cm / "hostsvc.yaml").symlink_to("..data/hostsvc.yaml")
    svc = hostsvc(None, watch=True, config_name="cm/hostsvc.yaml", port=port)
    assert svc.get_json("/echo/")["greeting"] == "hello"

    (cm / "..v2").mkdir()
    (cm / "..v2" / "hostsvc.yaml").write_text(fill(CONFIG % ("hola", "legacy"), port))
    (cm / "..data_tmp").symlink_to("..v2")
    os.replace(cm / "..data_tmp", cm / "..data")

    wait_for(lambda: svc.get_json("/echo/")["greeting"] == "hola", what="the watched reload")
    last = wait_for(lambda: svc.state()["last_reload"], what="the reload result")
    assert last["ok"] is True and last["message"] == "replaced: echo"
    assert "reason='config file changed'" in svc.stderr()


def test_a_reload_nginx_cannot_apply_keeps_the_old_apps(hostsvc) -> None:
    svc = hostsvc(CONFIG % ("hello", "legacy"))
    before = svc.state()["apps"]
    with socket.socket() as busy:            # a port someone else holds
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        new = (CONFIG % ("bonjour", "legacy")).replace(
            "listen: 127.0.0.1:{port}", f"listen: [127.0.0.1:{{port}}, 127.0.0.1:{busy_port}]")
        svc.write_config(new)
        os.kill(svc.proc.pid, signal.SIGHUP)
        last = wait_for(lambda: svc.state()["last_reload"], what="the reload result")
    assert last["ok"] is False and "nginx" in last["message"]
    # The old echo still serves, on the old socket; the new pool that was started is gone.
    assert svc.get_json("/echo/")["greeting"] == "hello"
    after = svc.state()["apps"]
    assert after["echo"]["pid"] == before["echo"]["pid"]
    assert after["echo"]["socket"] == before["echo"]["socket"]
    assert "event=reload_failed" in svc.stderr()
    assert f"unix:{before['echo']['socket']}" in (svc.runtime_dir / "nginx.conf").read_text()


def test_a_request_in_flight_during_a_reload_completes_on_the_old_version(hostsvc) -> None:
    svc = hostsvc(CONFIG % ("hello", "legacy"))
    response = svc.slow_request(2)
    svc.write_config(CONFIG % ("bonjour", "legacy"))
    os.kill(svc.proc.pid, signal.SIGHUP)
    status, _, body = response()
    assert status == 200 and json.loads(body)["greeting"] == "hello"
    wait_for(lambda: svc.state()["last_reload"], what="the reload result")
    assert svc.get_json("/echo/")["greeting"] == "bonjour"
