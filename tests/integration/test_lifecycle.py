"""Crash restarts with backoff, a broken app isolated behind 503, SIGTERM draining, and no
orphans after the supervisor is SIGKILLed."""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from harness import BASIC_CONFIG, survivors, wait_for
from hostsvc.procs import children_of

FLAKY_OK = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"flaky is fine"]
"""


def test_crashed_pool_restarts_and_a_broken_app_answers_503(hostsvc, tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY_OK)
    svc = hostsvc("""
        listen: 127.0.0.1:{port}
        python_path: [{apps}, .]
        apps:
          - name: flaky
            wsgi: flaky:app
            workers: 1
          - name: echo
            wsgi: echo:app
          - name: hello
            root: tree:Root
            workers: 1
    """)
    assert svc.request("/flaky/")[2] == b"flaky is fine"
    first = svc.state()["apps"]["flaky"]["pid"]

    # 1. the arbiter dies: the supervisor restarts it (same socket), and says so
    os.kill(first, signal.SIGKILL)
    state = wait_for(lambda: (a := svc.state()["apps"]["flaky"])["state"] == "running"
                     and a["pid"] not in (None, first) and a, what="flaky to restart")
    assert state["restarts"] == 1
    assert svc.request("/flaky/")[2] == b"flaky is fine"
    assert f"app=flaky pid={first} event=exited" in svc.stderr()
    assert "app=flaky event=restarting restarts=1" in svc.stderr()

    # 2. its code breaks on disk and it dies again: it cannot start any more; its prefix
    #    answers 503 while every other app keeps serving
    (tmp_path / "flaky.py").write_text("raise ImportError('flaky cannot start')\n")
    os.kill(state["pid"], signal.SIGKILL)
    wait_for(lambda: svc.state()["apps"]["flaky"]["restarts"] >= 2 and
             svc.state()["apps"]["flaky"]["state"] in ("backoff", "crashloop"),
             what="flaky to fail to start")
    status, headers, body = svc.request("/flaky/")
    assert status == 503 and b"not running" in body and headers["retry-after"] == "5"
    assert svc.get_json("/echo/")["app"] == "echo"
    assert svc.request("/hello/item/1")[2] == b"item 1"
    flaky = svc.state()["apps"]["flaky"]
    assert flaky["pid"] is None and "while starting" in flaky["last_error"]
    assert "ImportError: flaky cannot start" in svc.stderr()      # gunicorn's own report
    assert "event=failed_to_start" in svc.stderr()

    # 3. the code is fixed: the next backoff restart brings it back
    (tmp_path / "flaky.py").write_text(FLAKY_OK)
    wait_for(lambda: svc.state()["apps"]["flaky"]["state"] == "running", timeout=60,
             what="flaky to come back after the backoff")
    assert svc.request("/flaky/")[0] == 200


def test_sigterm_drains_in_flight_requests_and_exits_zero(hostsvc) -> None:
    svc = hostsvc(BASIC_CONFIG)
    pids = svc.remember_pids()
    assert len(pids) >= 6        # 2 arbiters + 3 workers + nginx master and workers
    response = svc.slow_request(1.5)
    assert svc.stop(signal.SIGTERM) == 0
    status, _, body = response()
    assert status == 200 and json.loads(body)["query"].startswith("sleep=1.5")
    assert not survivors(pids)
    assert "event=nginx_stopped" in svc.stderr() and "hostsvc: stopped" in svc.stderr()
    assert not (svc.runtime_dir / "hostsvc.pid").exists()
    assert all(a["state"] == "stopped" for a in svc.state()["apps"].values())


def test_sigkill_of_the_supervisor_leaves_no_orphans(hostsvc) -> None:
    svc = hostsvc(BASIC_CONFIG)
    wait_for(lambda: all(len(a["worker_pids"]) == a["workers"]
                         for a in svc.state()["apps"].values()), what="all workers")
    pids = svc.remember_pids()
    state = svc.state()
    expected = {state["nginx"]["pid"]} | {a["pid"] for a in state["apps"].values()} | {
        w for a in state["apps"].values() for w in a["worker_pids"]}
    assert expected <= set(pids)      # arbiters, workers and nginx are all descendants
    svc.proc.kill()
    svc.proc.wait(10)
    wait_for(lambda: not survivors(pids), timeout=30,
             what="arbiters, workers and nginx to follow the supervisor")
    assert not survivors(pids)


def test_nginx_that_dies_is_restarted(hostsvc) -> None:
    svc = hostsvc(BASIC_CONFIG)
    first = svc.state()["nginx"]["pid"]
    wait_for(lambda: len(svc.remember_pids()) >= 7, what="nginx workers")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: (n := svc.state()["nginx"])["state"] == "running" and n["pid"] != first,
             what="nginx to be restarted")
    wait_for(lambda: _answers(svc), what="requests to be served again")
    assert svc.get_json("/echo/")["app"] == "echo"
    assert f"pid={first} event=nginx_exited" in svc.stderr()


def _answers(svc) -> bool:
    try:
        return svc.request("/echo/")[0] == 200
    except OSError:
        return False


def test_a_port_in_use_stops_everything_with_a_clear_error(hostsvc) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()      # it even accepts connections: only nginx's own word counts
        svc = hostsvc(BASIC_CONFIG, wait=False, port=busy.getsockname()[1])
        assert svc.proc.wait(60) == 1
    err = svc.stderr()
    assert "Address already in use" in err
    assert "event=nginx_failed" in err and "a port in use?" in err
    assert "app=echo" in err and err.count("event=stopped") == 2
    assert not (svc.runtime_dir / "hostsvc.pid").exists()


def test_workers_of_a_killed_arbiter_do_not_outlive_it(hostsvc) -> None:
    """Review finding: a worker busy with a request when its arbiter was SIGKILLed used to
    be re-parented to PID 1 and keep running beside the restarted pool."""
    svc = hostsvc(BASIC_CONFIG)
    wait_for(lambda: all(len(a["worker_pids"]) == a["workers"]
                         for a in svc.state()["apps"].values()), what="all workers")
    echo = svc.state()["apps"]["echo"]
    workers = {pid: start for pid, start in svc.remember_pids().items()
               if pid in echo["worker_pids"]}
    assert len(workers) == echo["workers"]
    response = svc.slow_request(20)      # keeps one echo worker busy
    os.kill(echo["pid"], signal.SIGKILL)
    wait_for(lambda: not survivors(workers), timeout=15,
             what="the dead arbiter's workers to be killed")
    # A new arbiter, not the old one's "running": the workers die in the tick that marks
    # the pool failed, before state.json says so.
    wait_for(lambda: (a := svc.state()["apps"]["echo"])["state"] == "running"
             and a["pid"] not in (None, echo["pid"]), timeout=30, what="echo to restart")
    assert svc.get_json("/echo/")["app"] == "echo"
    status, _, _ = response()
    assert status in (502, 503)          # its request died with its worker


def test_pool_sockets_are_private_to_the_service_user(hostsvc) -> None:
    """Review finding: sockets were world-writable (gunicorn's umask 0), so any local user
    could reach a pool directly with forged X-Forwarded-For headers."""
    import stat
    svc = hostsvc(BASIC_CONFIG)
    sockets = svc.runtime_dir / "sockets"
    assert stat.S_IMODE(sockets.stat().st_mode) == 0o700
    for app in svc.state()["apps"].values():
        mode = stat.S_IMODE(os.stat(app["socket"]).st_mode)
        assert mode & 0o077 == 0, oct(mode)
    assert svc.get_json("/echo/")["app"] == "echo"   # nginx still reaches them


SLOW_BOOT = """
import sys, time
if sys.argv[1:2] == ["run"]:   # slow in its pool only (hostsvc.pool run), not in the check
    time.sleep(12)

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slow is up"]
"""


def test_one_slow_app_does_not_keep_the_others_offline(hostsvc, tmp_path: Path) -> None:
    """Review finding: nginx started only once every pool was ready, so an app taking
    long to boot kept every other app offline as long."""
    (tmp_path / "slowboot.py").write_text(SLOW_BOOT)
    svc = hostsvc("""
        listen: 127.0.0.1:{port}
        python_path: [{apps}, .]
        apps:
          - name: echo
            wsgi: echo:app
          - name: slow
            wsgi: slowboot:app
            workers: 1
    """, wait=False)
    wait_for(lambda: svc.state().get("nginx", {}).get("state") == "running", timeout=30,
             what="nginx to start")
    assert svc.state()["apps"]["slow"]["state"] == "starting"
    assert svc.get_json("/echo/")["app"] == "echo"
    assert svc.request("/slow/")[0] == 503
    assert "still starting: slow" in svc.stderr()
    wait_for(lambda: svc.state()["apps"]["slow"]["state"] == "running", timeout=60,
             what="slow to finish booting")
    assert svc.request("/slow/")[2] == b"slow is up"


def test_a_crash_during_a_reload_is_restarted_without_waiting_for_it(hostsvc,
                                                                     tmp_path: Path) -> None:
    """Review finding: while a reload waited for a new pool, a neighbour that crashed
    stayed down (503) until the reload finished."""
    (tmp_path / "slowboot.py").write_text(SLOW_BOOT)
    config = """
        listen: 127.0.0.1:{port}
        python_path: [{apps}, .]
        apps:
          - name: echo
            wsgi: echo:app
    """
    svc = hostsvc(config)
    first = svc.state()["apps"]["echo"]["pid"]
    svc.write_config(config + """
          - name: slow
            wsgi: slowboot:app
            workers: 1
    """)
    os.kill(svc.proc.pid, signal.SIGHUP)
    wait_for(lambda: "slow" in svc.state()["apps"] or "app=slow" in svc.stderr(),
             timeout=30, what="the reload to start the new pool")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: "app=echo event=restarting" in svc.stderr()
             and svc.request("/echo/")[0] == 200, timeout=10,
             what="echo to be restarted and serve while the reload still waits")
    assert "event=reloaded" not in svc.stderr()      # the reload is still waiting
    assert svc.get_json("/echo/")["app"] == "echo"
    wait_for(lambda: "event=reloaded" in svc.stderr(), timeout=60, what="the reload")
    assert svc.request("/slow/")[2] == b"slow is up"


@pytest.mark.engines("granian")
def test_a_granian_worker_crash_loop_restarts_the_pool(hostsvc) -> None:
    """granian replaces a crashed worker, but ends the whole pool when the same worker
    slot crashes again within 5.5 s (docs/config.md, Engines). The supervisor must then
    restart the pool with backoff, as for any pool that dies, and the neighbours serve."""
    svc = hostsvc(BASIC_CONFIG.replace("wsgi: echo:app", "wsgi: echo:app\n        workers: 1"))
    echo = svc.state()["apps"]["echo"]
    main, [worker] = echo["pid"], echo["worker_pids"]
    os.kill(worker, signal.SIGKILL)
    replacement = wait_for(lambda: [p for p in children_of(main) if p != worker],
                           what="granian to replace the killed worker")[0]
    assert svc.state()["apps"]["echo"]["restarts"] == 0          # a worker, not the pool
    os.kill(replacement, signal.SIGKILL)                          # again, within 5.5 s
    state = wait_for(lambda: (a := svc.state()["apps"]["echo"])["state"] == "running"
                     and a["pid"] not in (None, main) and a, timeout=30,
                     what="the pool to be restarted after granian gave up")
    assert state["restarts"] == 1
    # both kills are crashes; granian's stop of what was left is no "lifetime" restart
    text = svc.metrics_request("/metrics")[2].decode()
    assert 'hostsvc_worker_restarts_total{app="echo",cause="crash"} 2.0' in text, text
    assert 'cause="lifetime"' not in text, text
    assert "Worker crash loop detected" in svc.stderr()
    assert f"app=echo pid={main} event=exited" in svc.stderr()
    assert svc.get_json("/echo/")["app"] == "echo"
    assert svc.request("/hello/item/1")[2] == b"item 1"


def test_a_dead_worker_is_replaced_even_if_its_child_lives_on(hostsvc) -> None:
    """Review finding: the granian watcher waited for a worker's sentinel pipe, which a
    process the worker forked keeps open: a crashed worker went unnoticed for good."""
    svc = hostsvc(BASIC_CONFIG.replace("wsgi: echo:app", "wsgi: echo:app\n        workers: 1"))
    doc = svc.get_json("/echo/?fork=120")
    try:
        os.kill(doc["pid"], signal.SIGKILL)
        wait_for(lambda: (pids := svc.state()["apps"]["echo"]["worker_pids"]) and
                 doc["pid"] not in pids, what="the killed worker to be replaced")
        assert svc.get_json("/echo/")["pid"] != doc["pid"]
    finally:
        os.kill(doc["child"], signal.SIGKILL)


def test_the_process_environment_stays_out_of_the_wsgi_environ(hostsvc) -> None:
    """Review finding: granian copied os.environ into every environ, so HTTP_PROXY in
    the pool's env became a Proxy request header (and every secret was in it)."""
    svc = hostsvc(BASIC_CONFIG.replace("env: {GREETING: hello}",
                                       "env: {GREETING: hello, HTTP_PROXY: 'http://leak'}"))
    doc = svc.get_json("/echo/")
    assert doc["greeting"] == "hello"                    # the app still sees its env
    assert "Proxy" not in doc["headers"], doc["headers"]
