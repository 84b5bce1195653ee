"""hostsvc.metrics end to end: real gunicorn workers, real kills, real nginx, real scrapes.

Every scrape is read with prometheus_client's own parser. Counts are asserted exactly;
timings are printed, never asserted (shared CI machines are noisy).

PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported in this
process: see the `mp_dir` fixture.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostsvc.metrics import (SPECS, MetricsServer, archive_process, exported_names,
                             flush_requests, instrument, prepare_multiproc_dir)
from hostsvc.metrics.wsgi import FLUSH_INTERVAL
from hostsvc.procs import children_of
from hostsvc.proxy import nginx_binary

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"


@pytest.fixture(scope="module", autouse=True)
def mp_dir() -> Iterator[str]:
    """The metrics directory of this module's gunicorns and servers, set up the way the
    supervisor will: before this process imports prometheus_client (the parsers are
    imported inside the helpers for that reason). The variable is restored afterwards
    so other test modules' subprocesses do not inherit it."""
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = tempfile.mkdtemp(prefix="hostsvc-metrics-test-")
    values = sys.modules.get("prometheus_client.values")
    previous_class = values.ValueClass if values is not None else None
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        # An earlier test module (the status app's parser) imported prometheus_client in
        # this pytest process: choose its value class again, as a fresh import with the
        # variable set would, so the supervisor-side guard below holds as in production.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        values.ValueClass = values.get_value_class()
    prepare_multiproc_dir(path)
    yield path
    if values is not None:
        values.ValueClass = previous_class
    if previous is None:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
    shutil.rmtree(path, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Gunicorn:
    """A real gunicorn arbiter running tests/support/metrics_app.py with hostsvc's hooks."""

    def __init__(self, app: str, workers: int = 2, **settings: int) -> None:
        self.app, self.workers = app, workers
        self.port = free_port()
        env = dict(os.environ, TEST_APP_NAME=app, TEST_BIND=f"127.0.0.1:{self.port}",
                   TEST_WORKERS=str(workers), PYTHONPATH=f"{ROOT}:{SUPPORT}")
        env.update({f"TEST_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(SUPPORT / "metrics_gunicorn_conf.py"),
             "metrics_app:app"], env=env, cwd=SUPPORT, start_new_session=True)
        wait_for(lambda: len(self.worker_pids()) == workers and self._accepts(),
                 what=f"gunicorn {app} to boot")

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        return children_of(self.proc.pid) if self.proc.poll() is None else []

    def wait_replaced(self, old: list[int]) -> list[int]:
        """Wait until a full set of workers runs that differs from `old`."""
        return wait_for(lambda: (lambda p: p if len(p) == self.workers and p != old
                                 else None)(self.worker_pids()),
                        what=f"{self.app} workers to be replaced")

    def request(self, method: str, path: str, headers: dict[str, str] | None = None
                ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def app_state(self, state: str = "running") -> dict[str, Any]:
        alive = self.proc.poll() is None
        return {"prefix": f"/{self.app}", "state": state if alive else "stopped",
                "pid": self.proc.pid if alive else None, "workers": self.workers,
                "worker_pids": self.worker_pids(), "restarts": 0}

    def stop(self) -> None:
        """Graceful TERM; KILL the whole session if it does not end."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # any worker left in its session
        except ProcessLookupError:
            pass


@pytest.fixture
def gunicorns() -> Iterator[list[Gunicorn]]:
    started: list[Gunicorn] = []
    yield started
    for g in started:
        g.stop()


@pytest.fixture
def server_for() -> Iterator[Any]:
    """server_for(state_fn, **kw): a started MetricsServer on a free port, stopped after."""
    started: list[MetricsServer] = []

    def make(state: Any, **kw: Any) -> MetricsServer:
        srv = MetricsServer(state, listen="127.0.0.1:0", **kw)
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(srv: MetricsServer) -> Samples:
    """Every sample of a /metrics scrape, parsed by prometheus_client's parser."""
    status, headers, body = get(srv.port, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_when(srv: MetricsServer, check: Any, what: str) -> Samples:
    """The first scrape for which `check(samples)` holds. Workers write their requests
    in batches, up to FLUSH_INTERVAL after they end (hostsvc/metrics/wsgi.py)."""
    return wait_for(lambda: (lambda s: s if check(s) else None)(scrape(srv)), timeout=10,
                    what=what)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the sample with exactly these labels, or None if absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def requests_by(samples: Samples, app: str) -> Counter[tuple[str, str]]:
    """hostsvc_http_requests_total of `app` as {(method, code): count}, zeros dropped."""
    found: Counter[tuple[str, str]] = Counter()
    for (name, labels), v in samples.items():
        d = dict(labels)
        if name == "hostsvc_http_requests_total" and d["app"] == app and v:
            assert d["code_class"] == d["code"][0] + "xx"
            found[(d["method"], d["code"])] = int(v)
    return found


def assert_no_counter_went_back(before: Samples, after: Samples) -> None:
    counters = {s.name for s in SPECS if s.kind in ("counter", "histogram")}
    for (name, labels), v in before.items():
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        if base in counters or name in counters:
            assert after.get((name, labels), 0) >= v, (name, labels, v, after.get((name, labels)))


# -- request metrics through real workers -----------------------------------------------
def test_counts_exact_across_worker_kill_and_pool_restart(gunicorns: list[Gunicorn],
                                                          server_for: Any, mp_dir: str
                                                          ) -> None:
    g = Gunicorn("alpha")
    gunicorns.append(g)
    state = {"started_at": time.time() - 5, "apps": {"alpha": g.app_state()}}
    srv = server_for(lambda: state)
    sent: Counter[tuple[str, str]] = Counter()

    def send(method: str, path: str, n: int, headers: dict[str, str] | None = None) -> None:
        for _ in range(n):
            status, _ = g.request(method, path, headers)
            sent[(method if method != "PURGE" else "other", str(status))] += 1

    start = {"X-Request-Start": f"t={time.time():.3f}"}
    send("GET", "/code/200", 6, start)
    send("GET", "/code/404", 3)
    send("POST", "/code/500", 2)
    send("PURGE", "/code/200", 2)
    send("GET", "/stream", 3)
    scrape_when(srv, lambda s: requests_by(s, "alpha") == sent, "the requests to be written")
    time.sleep(2 * FLUSH_INTERVAL)     # whatever a worker still had would be written now
    first = scrape(srv)
    assert requests_by(first, "alpha") == sent
    assert sent[("GET", "404")] == 3 and sent[("POST", "500")] == 2
    assert value(first, "hostsvc_http_request_queue_seconds_count", app="alpha") == 6
    assert value(first, "hostsvc_http_response_size_bytes_count", app="alpha") == 16
    assert value(first, "hostsvc_http_response_size_bytes_sum", app="alpha") == 13 * 10 + 3 * 15
    assert value(first, "hostsvc_http_request_duration_seconds_count", app="alpha",
                 method="GET") == 12
    assert value(first, "hostsvc_http_requests_in_flight", app="alpha") == 0

    # A request stuck in a worker shows in flight; SIGKILL that worker mid-request.
    pidfile = os.path.join(mp_dir, "sleeper.pid")
    stuck = threading.Thread(target=lambda: pytest.raises(
        (http.client.HTTPException, OSError), g.request, "GET",
        f"/sleep/30?pidfile={pidfile}"), daemon=True)
    stuck.start()
    victim = int(wait_for(lambda: os.path.exists(pidfile) and Path(pidfile).read_text(),
                          what="the sleeping worker's pid"))
    state["apps"]["alpha"] = g.app_state()
    scrape_when(srv, lambda s: value(s, "hostsvc_http_requests_in_flight", app="alpha") == 1,
                "the stuck request in flight")
    old = g.worker_pids()
    os.kill(victim, signal.SIGKILL)
    stuck.join(10)
    assert victim not in g.wait_replaced(old)
    send("GET", "/code/200", 4)
    state["apps"]["alpha"] = g.app_state()
    second = scrape_when(srv, lambda s: requests_by(s, "alpha") == sent,
                         "the requests after the kill")
    assert_no_counter_went_back(first, second)
    assert value(second, "hostsvc_http_requests_in_flight", app="alpha") == 0
    assert value(second, "hostsvc_worker_restarts_total", app="alpha", cause="crash") == 1
    assert not [k for k in second if k[0] == "hostsvc_worker_restarts_total"
                and dict(k[1])["cause"] != "crash"]
    assert not list(Path(mp_dir).glob(f"*_{victim}.db")), "the dead worker's files remain"

    # Pool gauges computed from state() and /proc.
    assert value(second, "hostsvc_pool_workers", app="alpha", kind="live") == 2
    assert value(second, "hostsvc_pool_workers", app="alpha", kind="configured") == 2
    assert value(second, "hostsvc_pool_state", app="alpha", state="running") == 1
    assert value(second, "hostsvc_pool_state", app="alpha", state="backoff") == 0
    assert value(second, "hostsvc_app_ready", app="alpha") == 1
    assert value(second, "hostsvc_pool_memory_rss_bytes", app="alpha") > 10_000_000
    assert value(second, "hostsvc_pool_cpu_seconds_total", app="alpha") > 0
    assert value(second, "hostsvc_start_time_seconds") == state["started_at"]

    # The whole pool stops (graceful: its workers' exits are not restarts) and a new one
    # starts: nothing goes backwards, the dead arbiter's files are archived.
    arbiter = g.proc.pid
    g.stop()
    state["apps"]["alpha"] = g.app_state()
    third = scrape(srv)
    assert requests_by(third, "alpha") == sent
    assert_no_counter_went_back(second, third)
    assert value(third, "hostsvc_worker_restarts_total", app="alpha", cause="crash") == 1
    assert value(third, "hostsvc_pool_state", app="alpha", state="stopped") == 1
    assert not list(Path(mp_dir).glob(f"*_{arbiter}.db"))
    g2 = Gunicorn("alpha")
    gunicorns.append(g2)
    g = g2
    send("GET", "/code/200", 2)
    state["apps"]["alpha"] = g2.app_state()
    fourth = scrape_when(srv, lambda s: requests_by(s, "alpha") == sent,
                         "the new pool's requests")
    assert_no_counter_went_back(third, fourth)
    print(f"\nalpha: {sum(sent.values())} requests counted exactly; "
          f"files in the metrics dir: {len(os.listdir(mp_dir))}")


def test_timeout_and_max_requests_restarts(gunicorns: list[Gunicorn], server_for: Any
                                           ) -> None:
    g = Gunicorn("beta", workers=1, timeout=1, max_requests=3)
    gunicorns.append(g)
    srv = server_for(lambda: {"started_at": 0.0, "apps": {"beta": g.app_state()}})
    first = g.worker_pids()
    for _ in range(3):
        assert g.request("GET", "/code/200")[0] == 200
    second = g.wait_replaced(first)            # max_requests reached: a clean restart
    t0 = time.monotonic()
    # The arbiter aborts the worker after ~1-2 s; gunicorn still answers 500.
    assert g.request("GET", "/sleep/6")[0] == 500
    g.wait_replaced(second)
    print(f"\ntimeout restart took {time.monotonic() - t0:.1f}s")
    # Both exits went through Python (max_requests, the timeout's abort), which writes
    # what the worker had queued: the counts are there without waiting for a flush.
    samples = scrape(srv)
    restarts = {dict(k[1])["cause"]: v for k, v in samples.items()
                if k[0] == "hostsvc_worker_restarts_total" and dict(k[1])["app"] == "beta"}
    assert restarts == {"max_requests": 1, "timeout": 1}
    assert requests_by(samples, "beta") == {("GET", "200"): 3, ("GET", "500"): 1}
    # The aborted worker's in-flight 1 is gone (the new worker has served nothing yet).
    assert value(samples, "hostsvc_http_requests_in_flight", app="beta") in (None, 0)


def test_gthread_worker_counts_concurrent_requests(gunicorns: list[Gunicorn],
                                                   server_for: Any, tmp_path: Path) -> None:
    """hostsvc runs gthread workers when an app has threads > 1: in-flight is per
    request, not per process."""
    g = Gunicorn("epsilon", workers=1, threads=4)
    gunicorns.append(g)
    srv = server_for(lambda: {"started_at": 0.0, "apps": {"epsilon": g.app_state()}})
    pidfiles = [str(tmp_path / f"epsilon-{i}.pid") for i in range(3)]
    sleepers = [threading.Thread(target=g.request, args=("GET", f"/sleep/2?pidfile={p}"))
                for p in pidfiles]
    for t in sleepers:
        t.start()
    wait_for(lambda: all(os.path.exists(p) for p in pidfiles), what="3 requests in flight")
    scrape_when(srv, lambda s: value(s, "hostsvc_http_requests_in_flight", app="epsilon") == 3,
                "3 requests in flight")
    for t in sleepers:
        t.join(10)
    samples = scrape_when(srv, lambda s: requests_by(s, "epsilon") == {("GET", "200"): 3},
                          "the 3 requests to be written")
    assert value(samples, "hostsvc_http_requests_in_flight", app="epsilon") == 0
    assert value(samples, "hostsvc_http_request_duration_seconds_bucket", app="epsilon",
                 method="GET", le="1.0") == 0
    assert value(samples, "hostsvc_http_request_duration_seconds_bucket", app="epsilon",
                 method="GET", le="2.5") == 3


# -- instrument() in this process: batches against observe(), flushes, forks ------------
def _app(environ: dict[str, Any], start_response: Any) -> Any:
    """/<code>?<size>: that status and body size; /stream: 3 chunks; /raise: an error."""
    path, size = environ["PATH_INFO"], int(environ.get("QUERY_STRING") or 0)
    if path == "/raise":
        raise RuntimeError("app error")
    start_response(f"{path[1:4] if path != '/stream' else '200'} X", [])
    if path == "/stream":
        return iter([b"12345"] * 3)
    return [b"x" * size]


def _server_start_response(status: Any, headers: Any, exc_info: Any = None) -> None:
    """The server's start_response in _drive's requests."""


class _KeyedApp:
    """_app as an app that leaves its status line in the environ itself, as
    hostsvc.web's Application does: the middleware must not wrap start_response."""

    status_environ_key = "test.status"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        assert start_response is _server_start_response, "start_response was wrapped"

        def keeping(status: Any, headers: Any, exc_info: Any = None) -> None:
            environ[self.status_environ_key] = status
            start_response(status, headers, exc_info)
        return _app(environ, keeping)


def _drive(app: Any, requests: list[tuple[str, str, str]],
           start: str | None = "t=1000.000") -> list[tuple[dict[str, Any], bytes]]:
    """Send (method, path, query) requests as a server does: body iterated, closed.
    Returns each answered request's environ and body."""
    import io

    sent = []
    for method, path, query in requests:
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                   "wsgi.input": io.BytesIO(b"")}
        if start is not None:
            environ["HTTP_X_REQUEST_START"] = start
        try:
            body = app(environ, _server_start_response)
        except RuntimeError:
            continue
        sent.append((environ, b"".join(body)))
        getattr(body, "close", lambda: None)()
    return sent


def _web_tree() -> Any:
    """A hostsvc.web object tree: / (200), /stream (a streamed 200), /gone (410)."""
    from hostsvc import web

    class Root:
        @web.expose
        def index(self) -> str:
            return "hi"

        @web.expose
        def stream(self) -> Iterator[bytes]:
            yield b"12345"

        @web.expose
        def gone(self) -> str:
            raise web.HTTPError(410)
    return Root()


def _file_values(mp: Path, pid: int, app: str) -> dict[tuple[str, str], float]:
    """`app`'s values in the files of process `pid`, by (series name, labels as JSON)."""
    from prometheus_client.mmap_dict import MmapedDict

    found = {}
    for f in mp.glob(f"*_{pid}.db"):
        for key, v, _ts, _pos in MmapedDict.read_all_values_from_file(str(f)):
            _metric, name, labels, _help = json.loads(key)
            if labels.pop("app", None) == app:
                found[(name, json.dumps(labels, sort_keys=True))] = v
    return found


def _requests_written(mp: Path, pid: int, app: str) -> float:
    return sum(v for (name, _), v in _file_values(mp, pid, app).items()
               if name == "hostsvc_http_requests_total")


def _in_child(test: Any, mp: Path) -> int:
    """Run `test` in a forked child writing its metrics to `mp`; return the child's pid.

    prometheus_client copies every value a process created into the files of each child
    it forks later (other tests fork hundreds), so an in-process test's values must
    neither exist in this process nor land in the module's directory. The child ends
    with os._exit, which skips the exit flush: a test flushes what it wants written."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp)
            test()
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            os._exit(1)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        report = fh.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, report
    return pid


REQUESTS = [("GET", "/200", "13"), ("GET", "/404", "0"), ("POST", "/201", "5000"),
            ("PURGE", "/200", "7"), ("GET", "/stream", ""), ("DELETE", "/raise", ""),
            ("PUT", "/abc", "1"), ("PATCH", "/099", "2")] * 3
# Durations the test clock gives REQUESTS' requests, in turn: exact in binary, one in
# each of several buckets (1 ms, 5 ms, 50 ms, 1 s, 30 s, +Inf).
DURATIONS = (1 / 2048, 3 / 1024, 1 / 32, 3 / 4, 12.0, 64.0)
WALL = 1010.25          # the test's wall clock, for queue times
# X-Request-Start headers and the queue time each gives at WALL (None: not observed).
QUEUE_CASES = [("t=1000.000", 10.25),            # above the last bound: +Inf
               ("t=1009.25", 1.0), ("t=1010.000", 0.25),   # on a bound: that bucket
               ("t=1006.5", 3.75),
               ("t=1010.5", 0.0),                # nginx's clock behind by < 1 s: 0
               ("t=1733079000123", None),        # from the future, or in ms: dropped
               ("t=-90000", None),               # a day or more: dropped
               ("bogus", None), ("t=", None), (None, None)]


def _expected_code(path: str) -> str:
    """What _app answers `path` with, as the metrics must count it: a status line
    that does not start with a code of 100-999 is what the server answers, a 500."""
    if path == "/stream":
        return "200"
    code = path[1:4]
    return code if code.isdigit() and int(code) >= 100 else "500"


def _expected_size(path: str, query: str) -> int:
    return 15 if path == "/stream" else 0 if path == "/raise" else int(query)


@pytest.mark.parametrize("inner", [_app, _KeyedApp()], ids=["wrapped", "status-key"])
def test_the_tally_writes_what_observe_would(tmp_path: Path, inner: Any) -> None:
    """The same requests, counted by the C tally and written once per series, must
    leave the files exactly as one observe() per request through the public API does:
    with the status line caught by the middleware's start_response, or left by the
    app."""
    _in_child(lambda: _compare_tally_and_observed(tmp_path, inner), tmp_path)


def _compare_tally_and_observed(mp: Path, inner: Any) -> None:
    from hostsvc.metrics import spec, wsgi

    wsgi.FLUSH_INTERVAL = 3600.0             # no flusher thread writes (a child process)
    sent = [(method, path, query, header) for header, _ in QUEUE_CASES
            for method, path, query in REQUESTS]
    durations = [DURATIONS[i % len(DURATIONS)] for i in range(len(sent))]
    # Each request reads the monotonic clock as it begins and as it ends, in turn.
    readings = iter([t for i, d in enumerate(durations) for t in (100.0 * i, 100.0 * i + d)])
    app = wsgi._Recorder("tallied", inner,
                         clocks=(lambda: next(readings), lambda: WALL)).tally
    for method, path, query, header in sent:
        _drive(app, [(method, path, query)], start=header)
    assert next(readings, None) is None, "a request read the clock more or less than twice"
    flush_requests()
    # The reference: each request through prometheus_client's public API, one by one.
    m = spec.mp_metrics()
    queued = dict(QUEUE_CASES)
    for (method, path, query, header), duration in zip(sent, durations):
        method = method if method in wsgi.KNOWN_METHODS else "other"
        code = _expected_code(path)
        m["hostsvc_http_requests_total"].labels("reference", method, code,
                                                code[0] + "xx").inc()
        m["hostsvc_http_request_duration_seconds"].labels("reference", method).observe(
            duration)
        m["hostsvc_http_response_size_bytes"].labels("reference").observe(
            _expected_size(path, query))
        if queued[header] is not None:
            m["hostsvc_http_request_queue_seconds"].labels("reference").observe(
                queued[header])
    m["hostsvc_http_requests_in_flight"].labels("reference")
    written = _file_values(mp, os.getpid(), "tallied")
    assert written == _file_values(mp, os.getpid(), "reference")
    # And a few values by hand, so the reference itself is checked.
    per_header = len(REQUESTS)
    total = '{"code": "200", "code_class": "2xx", "method": "GET"}'
    assert written[("hostsvc_http_requests_total", total)] == 2 * 3 * len(QUEUE_CASES)
    for labels in ('{"code": "500", "code_class": "5xx", "method": "DELETE"}',
                   '{"code": "500", "code_class": "5xx", "method": "PUT"}',
                   '{"code": "500", "code_class": "5xx", "method": "PATCH"}'):
        assert written[("hostsvc_http_requests_total", labels)] == 3 * len(QUEUE_CASES)
    assert written[("hostsvc_http_requests_total",
                    '{"code": "200", "code_class": "2xx", "method": "other"}')] == \
        3 * len(QUEUE_CASES)
    # (the files keep one value per bucket; a scrape cumulates them and adds _count)
    queue_buckets = {json.loads(labels)["le"]: v for (name, labels), v in written.items()
                     if name == "hostsvc_http_request_queue_seconds_bucket"}
    assert queue_buckets["+Inf"] == per_header
    assert queue_buckets["1.0"] == queue_buckets["0.25"] == queue_buckets["5.0"] == per_header
    assert queue_buckets["0.0005"] == per_header
    assert sum(queue_buckets.values()) == 5 * per_header
    assert written[("hostsvc_http_request_duration_seconds_bucket",
                    '{"le": "+Inf", "method": "GET"}')] > 0
    assert written[("hostsvc_http_requests_in_flight", "{}")] == 0


def test_the_tally_keeps_no_reference_to_a_request(tmp_path: Path) -> None:
    """The C middleware holds what it counts in plain numbers: after each request, on
    every path (a list body, a stream, an exception, a wrapped start_response), the
    objects it was handed or given back have the references they had before."""
    _in_child(_references_after_requests, tmp_path)


def _references_after_requests() -> None:
    import gc

    from hostsvc.metrics import wsgi

    wsgi.FLUSH_INTERVAL = 3600.0
    gc.collect()
    for inner in (_app, _KeyedApp()):
        app = instrument("references", inner)
        _drive(app, REQUESTS)                           # warm: children bound, caches
        for method, path, query in REQUESTS:
            environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                       "HTTP_X_REQUEST_START": "t=1000.000"}
            values = list(environ.values())
            before = [sys.getrefcount(v) for v in values]
            environ_refs = sys.getrefcount(environ)
            start_refs = sys.getrefcount(_server_start_response)
            try:
                body = app(environ, _server_start_response)
            except RuntimeError:
                body = None
            if body is not None:
                body_refs = sys.getrefcount(body)
                chunks = list(body)
                getattr(body, "close", lambda: None)()
                assert sys.getrefcount(body) == body_refs, path
                del body, chunks
            gc.collect()
            assert sys.getrefcount(environ) == environ_refs, path
            assert sys.getrefcount(_server_start_response) == start_refs, path
            assert [sys.getrefcount(v) for v in values] == before, path
    flush_requests()


# -- the C tally on its own (no files: what take() returns) ------------------------------
def _tally(app: Any, start: Any = lambda: True, wrap: bool = True) -> Any:
    from hostsvc.metrics._tally import Tally
    from hostsvc.metrics.spec import DURATION_BUCKETS, QUEUE_BUCKETS, SIZE_BUCKETS

    return Tally(app, "test.status", wrap, start,
                 (DURATION_BUCKETS, QUEUE_BUCKETS, SIZE_BUCKETS))


def _counted(taken: tuple[Any, ...]) -> list[tuple[str, int, int]]:
    return sorted(taken[1])


def _generator_app(environ: dict[str, Any], start_response: Any) -> Any:
    start_response("200 OK", [])
    yield b"x"


def test_a_dropped_body_in_a_garbage_cycle_still_ends_its_request() -> None:
    """A streamed body the server drops without close(), caught in a reference cycle:
    the collector clears the cycle, and the request is recorded before it does (a
    finalizer), not lost with the body, which would leave it in flight for good."""
    import gc

    tally = _tally(_generator_app)
    gc.collect()
    environ = {"REQUEST_METHOD": "GET"}
    body = tally(environ, _server_start_response)
    assert list(body) == [b"x"]
    environ["response"] = body                      # environ <-> body
    del environ, body
    gc.collect()
    taken = tally.take()
    assert taken[0] == 0, "the request stayed in flight"
    assert _counted(taken) == [("GET", 200, 1)]


CLEARED_TALLY = """
import gc
from hostsvc.metrics._tally import Tally

class Recorder:                      # as wsgi._Recorder: tally -> start -> recorder -> tally
    def start(self):
        return True

def app(environ, start_response):
    start_response("200 OK", [])
    yield b"x"

gc.collect()
recorder = Recorder()
recorder.tally = Tally(app, "k", True, recorder.start, ((1.0,), (1.0,), (1.0,)))
environ = {"REQUEST_METHOD": "GET", "wsgi.input": []}
body = recorder.tally(environ, lambda *a: None)
environ["response"] = body           # a second cycle, younger than the tally's
del recorder, body, environ
gc.collect()
print("survived")
"""


def test_collecting_a_tally_with_a_dropped_body_does_not_crash() -> None:
    """The collector may clear a tally before a dropped body of the same garbage
    records into it (at the latest at interpreter exit): the tally keeps what
    recording reads. In a subprocess: the failure was a segfault."""
    out = subprocess.run([sys.executable, "-c", CLEARED_TALLY], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and out.stdout.strip() == "survived", out.stderr


def test_take_loses_nothing_to_a_collection_it_triggers() -> None:
    """On Python 3.11 an allocation in take() can run the collector, whose callbacks and
    finalizers run Python code, such as another thread's request. What such a request
    adds must land in the next take(), not be zeroed with this one's."""
    import gc

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response(environ["STATUS"], [])
        return [b"abc"]
    tally = _tally(app)
    inside = {"take": False, "requests": 0}

    def request_during_collection(phase: str, info: Any) -> None:
        if phase == "start" and inside["take"]:
            inside["requests"] += 1
            tally({"REQUEST_METHOD": "GET", "STATUS": "200 OK"}, _server_start_response)
    gc.callbacks.append(request_during_collection)
    threshold = gc.get_threshold()
    gc.set_threshold(1)                              # a collection at every allocation
    made = counted = 0
    try:
        for _ in range(300):
            for method in ("GET", "POST", "PUT", "DELETE"):
                for status in ("200 OK", "201 Created", "404 Not Found", "500 Oops"):
                    tally({"REQUEST_METHOD": method, "STATUS": status},
                          _server_start_response)
                    made += 1
            inside["take"] = True
            taken = tally.take()
            inside["take"] = False
            counted += sum(n for _, _, n in taken[1])
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(request_during_collection)
    counted += sum(n for _, _, n in tally.take()[1])
    print(f"requests made during take(): {inside['requests']}")
    assert counted == made + inside["requests"]


def test_an_exit_raised_while_binding_ends_the_request_and_the_next_binds(
        monkeypatch: Any) -> None:
    """SystemExit (gunicorn's quit and abort handlers) or KeyboardInterrupt raised while
    the metrics are bound at a worker's first request ends that request, as it would
    have without metrics; it must not be swallowed, nor turn the metrics off."""
    calls = []

    def start() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise SystemExit(0)
        return True
    tally = _tally(lambda environ, start_response: (start_response("200 OK", []), [b"x"])[1],
                   start)
    with pytest.raises(SystemExit):
        tally({"REQUEST_METHOD": "GET"}, _server_start_response)
    assert tally({"REQUEST_METHOD": "GET"}, _server_start_response) == [b"x"]
    assert len(calls) == 2
    assert _counted(tally.take()) == [("GET", 200, 1)]

    def failing() -> bool:          # an Exception is the metrics' own: served without
        raise RuntimeError("cannot bind")
    off = _tally(lambda environ, start_response: (start_response("200 OK", []), [b"x"])[1],
                 failing)
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    assert off({"REQUEST_METHOD": "GET"}, _server_start_response) == [b"x"]
    assert off({"REQUEST_METHOD": "GET"}, _server_start_response) == [b"x"]
    assert [str(u.exc_value) for u in unraisable] == ["cannot bind"]     # reported once
    assert _counted(off.take()) == []


def test_a_status_the_server_refused_is_not_counted_over_the_one_it_sent() -> None:
    """start_response with exc_info after the headers went out: the server re-raises
    (PEP 3333) and the client keeps the 200 it got; that is what is counted."""
    class Failed(Exception):
        pass

    def server_start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        if exc_info:
            raise exc_info[1]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            yield b"part"
            try:
                raise Failed()
            except Failed:
                start_response("500 Error", [], sys.exc_info())
            yield b"never"
        return body()
    tally = _tally(app)
    body = tally({"REQUEST_METHOD": "GET"}, server_start_response)
    with pytest.raises(Failed):
        list(body)
    body.close()
    assert _counted(tally.take()) == [("GET", 200, 1)]


def test_a_body_whose_close_is_none_is_closed_quietly() -> None:
    class Body:
        close = None

        def __iter__(self) -> Iterator[bytes]:
            return iter([b"abc"])
    tally = _tally(lambda environ, start_response: (start_response("200 OK", []), Body())[1])
    body = tally({"REQUEST_METHOD": "GET"}, _server_start_response)
    assert list(body) == [b"abc"]
    assert body.close() is None
    taken = tally.take()
    assert _counted(taken) == [("GET", 200, 1)] and taken[4][0] == 3


def test_the_tally_refuses_bad_buckets_and_calls() -> None:
    from hostsvc.metrics._tally import Tally

    class Shrinking(list):              # a bound whose conversion changes the sequence
        def __init__(self) -> None:
            super().__init__([0.1, 1.0, 2.0])

    bounds = Shrinking()

    class Sneaky(float):
        def __float__(self) -> float:
            bounds.clear()
            return 0.5
    bounds[0] = Sneaky(0.1)
    made = Tally(_app, "k", True, lambda: True, iter([bounds, [1.0], [1.0]]))
    assert made({"REQUEST_METHOD": "GET", "PATH_INFO": "/200"}, _server_start_response)
    for buckets, error in [(([1.0, 1.0], [1.0], [1.0]), "increasing"),
                           (([float("inf")], [1.0], [1.0]), "finite"),
                           (([], [1.0], [1.0]), "bucket bounds"),
                           (([1.0], [1.0]), "duration, queue, size")]:
        with pytest.raises(ValueError, match=error):
            Tally(_app, "k", True, lambda: True, buckets)
    with pytest.raises(TypeError, match="environ, start_response"):
        made({"REQUEST_METHOD": "GET"})


def test_the_flusher_thread_writes_an_idle_workers_last_requests(tmp_path: Path,
                                                                 monkeypatch: Any) -> None:
    _in_child(lambda: _idle_tail(tmp_path, monkeypatch), tmp_path)


def _idle_tail(mp: Path, monkeypatch: Any) -> None:
    from hostsvc.metrics import wsgi

    monkeypatch.setattr(wsgi, "FLUSH_INTERVAL", 2.0)   # 5 requests take far less
    app = instrument("idle", _app)
    _drive(app, [("GET", "/200", "1")] * 5)
    assert _requests_written(mp, os.getpid(), "idle") == 0     # requests never write
    wait_for(lambda: _requests_written(mp, os.getpid(), "idle") == 5,
             timeout=10, what="the flusher thread")


EXITING_WORKER = """
import os, sys
from hostsvc.metrics import instrument, wsgi
wsgi.FLUSH_INTERVAL = 3600.0          # only the exit can write the counted requests

def hello(environ, start_response):
    start_response("200 OK", [])
    return [b"hi"]

def serve():
    app = instrument("exiting", hello)
    for _ in range(7):
        app({"REQUEST_METHOD": "GET"}, lambda *a: None)
    print(os.getpid(), flush=True)

if sys.argv[1] == "multiprocessing":      # as granian's workers end: os._exit
    import multiprocessing
    child = multiprocessing.get_context("fork").Process(target=serve)
    child.start()
    child.join()
    sys.exit(child.exitcode)
serve()
sys.exit(3)                               # as gunicorn's workers end: SystemExit
"""


@pytest.mark.parametrize("how", ["sys.exit", "multiprocessing"])
def test_a_worker_exiting_through_python_writes_what_it_counted(tmp_path: Path, how: str
                                                                ) -> None:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", EXITING_WORKER, how], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == (3 if how == "sys.exit" else 0), out.stderr
    pid = int(out.stdout.split()[0])
    assert _requests_written(tmp_path, pid, "exiting") == 7, out.stderr


def test_child_forked_after_binding_writes_its_own_files(tmp_path: Path,
                                                        monkeypatch: Any) -> None:
    """A child forked from a worker with requests counted and not yet written writes
    only its own requests, to its own files; the parent's stay the parent's to write."""
    _in_child(lambda: _fork_after_binding(tmp_path, monkeypatch), tmp_path)


def _fork_after_binding(mp: Path, monkeypatch: Any) -> None:
    from hostsvc.metrics import wsgi

    monkeypatch.setattr(wsgi, "FLUSH_INTERVAL", 3600.0)
    app = instrument("forked", _app)
    _drive(app, REQUESTS[:3])                # counted, not written
    parent = _file_values(mp, os.getpid(), "forked")
    assert _requests_written(mp, os.getpid(), "forked") == 0

    def child() -> None:
        _drive(app, REQUESTS)
        flush_requests()
    pid = _in_child(child, mp)
    assert _file_values(mp, os.getpid(), "forked") == parent
    assert _requests_written(mp, pid, "forked") == len(REQUESTS)     # /raise as 500s
    assert _file_values(mp, pid, "forked")[("hostsvc_http_requests_in_flight", "{}")] == 0
    flush_requests()
    assert _requests_written(mp, os.getpid(), "forked") == 3


def test_a_fork_waits_for_a_batch_being_written(tmp_path: Path, monkeypatch: Any) -> None:
    """The flusher thread holds prometheus_client's lock while it writes; a child
    forked at that moment would hang at its first metric write. A fork waits."""
    _in_child(lambda: _fork_during_flush(tmp_path, monkeypatch), tmp_path)


def _fork_during_flush(mp: Path, monkeypatch: Any) -> None:
    from hostsvc.metrics import wsgi

    monkeypatch.setattr(wsgi, "FLUSH_INTERVAL", 3600.0)
    writing, release = threading.Event(), threading.Event()
    write = wsgi._Recorder._write

    def slow_write(self: Any, *args: Any) -> None:
        writing.set()
        release.wait(10)
        write(self, *args)
    app = instrument("forking", _app)
    _drive(app, [("GET", "/200", "1")] * 3)
    monkeypatch.setattr(wsgi._Recorder, "_write", slow_write)
    flusher = threading.Thread(target=flush_requests)
    flusher.start()
    assert writing.wait(10)
    forked: list[int] = []

    def in_the_child() -> None:
        wsgi._Recorder._write = write            # no waiting for the parent's event
        _drive(app, [("GET", "/201", "1")])
        flush_requests()

    def fork_child() -> None:
        forked.append(_in_child(in_the_child, mp))
    forking = threading.Thread(target=fork_child)
    forking.start()
    forking.join(0.5)
    assert forking.is_alive() and not forked, "the fork did not wait for the batch"
    release.set()
    flusher.join(10)
    forking.join(20)
    assert forked and _requests_written(mp, forked[0], "forking") == 1
    assert _requests_written(mp, os.getpid(), "forking") == 3


def test_a_bad_status_costs_its_own_count_only(tmp_path: Path) -> None:
    """A status that is not a str (an app's mistake the server rejects) is a 500; the
    requests around it are written and nothing stays in flight."""
    _in_child(lambda: _bad_status(tmp_path), tmp_path)


def _bad_status(mp: Path) -> None:
    def wrong(environ: dict[str, Any], start_response: Any) -> Any:
        start_response(200, [])                 # an int: the server would refuse it
        yield b"x"
    good, bad = instrument("good", _app), instrument("good", wrong)
    _drive(good, [("GET", "/200", "1")] * 10)
    _drive(bad, [("GET", "/", "")])
    _drive(good, [("GET", "/200", "1")] * 2)
    flush_requests()
    written = _file_values(mp, os.getpid(), "good")
    assert _requests_written(mp, os.getpid(), "good") == 13
    assert written[("hostsvc_http_requests_total",
                    '{"code": "500", "code_class": "5xx", "method": "GET"}')] == 1
    assert written[("hostsvc_http_requests_in_flight", "{}")] == 0


def _codes_written(mp: Path, app: str) -> dict[str, float]:
    """`app`'s request counts in this process's files, by code."""
    codes: Counter[str] = Counter()
    for (name, labels), v in _file_values(mp, os.getpid(), app).items():
        if name == "hostsvc_http_requests_total":
            codes[json.loads(labels)["code"]] += v
    return dict(codes)


def test_a_generator_app_is_counted_under_the_status_it_sends_when_iterated(
        tmp_path: Path) -> None:
    """A generator app calls start_response only when the server first iterates its
    body, after the middleware has returned: the status is read at close()."""
    _in_child(lambda: _lazy_status(tmp_path), tmp_path)


def _lazy_status(mp: Path) -> None:
    def lazy(environ: dict[str, Any], start_response: Any) -> Any:
        start_response(f"{environ['PATH_INFO'][1:]} Lazy", [])
        yield b"abc"
        yield b"de"
    app = instrument("lazy", lazy)
    _drive(app, [("GET", "/201", ""), ("GET", "/202", ""), ("POST", "/409", "")])
    flush_requests()
    assert _codes_written(mp, "lazy") == {"201": 1, "202": 1, "409": 1}
    written = _file_values(mp, os.getpid(), "lazy")
    assert written[("hostsvc_http_response_size_bytes_sum", "{}")] == 15


def test_a_streamed_body_is_recorded_once_when_closed_or_dropped(tmp_path: Path) -> None:
    """The server closes the body (PEP 3333): the app's close() runs, raising or not,
    and the request is recorded with the bytes sent so far. A body dropped without
    close() still ends its request, so nothing stays in flight."""
    _in_child(lambda: _streams_closed(tmp_path), tmp_path)


def _streams_closed(mp: Path) -> None:
    import gc

    closed: list[str] = []

    class Body:
        def __init__(self, path: str) -> None:
            self.path = path

        def __iter__(self) -> Iterator[bytes]:
            yield b"1234"
            yield b"56"

        def close(self) -> None:
            closed.append(self.path)
            if self.path == "/fails":
                raise OSError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("206 Partial", [])
        return Body(environ["PATH_INFO"])

    tally = instrument("streams", app)
    sent = _drive(tally, [("GET", "/whole", "")])
    assert sent[0][1] == b"123456"
    body = tally({"REQUEST_METHOD": "POST", "PATH_INFO": "/partly"}, _server_start_response)
    assert next(iter(body)) == b"1234"                  # the client went away
    body.close()
    body.close()                    # twice: passed on twice, the request recorded once
    body = tally({"REQUEST_METHOD": "PUT", "PATH_INFO": "/fails"}, _server_start_response)
    with pytest.raises(OSError, match="close failed"):
        body.close()
    body = tally({"REQUEST_METHOD": "GET", "PATH_INFO": "/dropped"}, _server_start_response)
    list(body)
    del body
    gc.collect()
    assert closed == ["/whole", "/partly", "/partly", "/fails"]   # not the dropped one's
    flush_requests()
    written = _file_values(mp, os.getpid(), "streams")
    assert _codes_written(mp, "streams") == {"206": 4}
    assert written[("hostsvc_http_response_size_bytes_sum", "{}")] == 6 + 4 + 0 + 6
    assert written[("hostsvc_http_requests_in_flight", "{}")] == 0


def test_a_mounted_web_app_leaves_its_status_line_to_the_middleware(tmp_path: Path
                                                                   ) -> None:
    """hostsvc.web's Application and the mount around it (its 404 for a path outside
    the prefix) leave the status line in the environ, so the middleware passes the
    server's start_response on unwrapped and still counts every code."""
    _in_child(lambda: _web_app_statuses(tmp_path), tmp_path)


def _web_app_statuses(mp: Path) -> None:
    from hostsvc import web
    from hostsvc.loader import PrefixMiddleware
    from hostsvc.metrics import wsgi

    mounted = PrefixMiddleware(web.Application(_web_tree(), "/blog"), "/blog")
    app = instrument("web", mounted)
    paths = ("/blog/", "/blog/stream", "/blog/gone", "/blog/missing", "/elsewhere")
    sent = _drive(app, [("GET", path, "") for path in paths])
    assert len(sent) == len(paths)
    for environ, body in sent:
        assert body
        assert wsgi.STATUS_KEY not in environ, "start_response was wrapped"
    flush_requests()
    assert _codes_written(mp, "web") == {"200": 2, "410": 1, "404": 2}


def test_an_app_that_only_inherits_the_status_key_gets_its_start_response_wrapped(
        tmp_path: Path) -> None:
    """The status_environ_key attribute is believed only from the class whose __call__
    serves: a subclass overriding __call__ or a wrapper forwarding attributes would
    otherwise be counted under a missing (500) or stale status."""
    _in_child(lambda: _inherited_status_keys(tmp_path), tmp_path)


def _inherited_status_keys(mp: Path) -> None:
    from hostsvc import web
    from hostsvc.loader import PrefixMiddleware
    from hostsvc.statusline import status_environ_key

    class Health(web.Application):            # answers a path itself
        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            if environ["PATH_INFO"] == "/healthz":
                start_response("200 OK", [])
                return [b"ok"]
            return super().__call__(environ, start_response)

    class Gone(web.Application):              # rewrites the status it passes on
        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            def rewrite(status: str, headers: Any, exc_info: Any = None) -> Any:
                return start_response("410 Gone" if status.startswith("404") else status,
                                      headers, exc_info)
            return super().__call__(environ, rewrite)

    class Copying:                            # forwards attributes, copies the environ
        def __init__(self, app: Any) -> None:
            self.app = app

        def __getattr__(self, name: str) -> Any:
            return getattr(self.app, name)

        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            return self.app(dict(environ), start_response)

    class Plain(web.Application):             # the stock __call__: still believed
        pass

    cases = [(Health(_web_tree()), "/healthz", "200", None),
             (Gone(_web_tree()), "/missing", "410", None),
             (Copying(web.Application(_web_tree())), "/", "200", None),
             (Plain(_web_tree()), "/", "200", "hostsvc.status")]
    for i, (inner, path, expected, key) in enumerate(cases):
        assert status_environ_key(inner) == key
        mounted = PrefixMiddleware(inner, "/")
        assert mounted.status_environ_key == key
        app = instrument(f"inherited{i}", mounted)
        assert len(_drive(app, [("GET", path, "")] * 2)) == 2
        flush_requests()
        assert _codes_written(mp, f"inherited{i}") == {expected: 2}


def test_a_signal_handler_cannot_cut_a_batch_short(tmp_path: Path) -> None:
    """gunicorn ends a worker with sys.exit() from signal handlers in the main thread;
    one arriving while the main thread writes a batch (the exit flush) runs after it."""
    _in_child(lambda: _signal_in_batch(tmp_path), tmp_path)


def _signal_in_batch(mp: Path) -> None:
    from hostsvc.metrics import wsgi

    def exit_now(signum: int, frame: Any) -> None:
        raise SystemExit(0)
    signal.signal(signal.SIGUSR1, exit_now)
    wsgi.FLUSH_INTERVAL = 3600.0
    write = wsgi._Recorder._write
    app = instrument("signalled", _app)
    _drive(app, [("GET", "/200", "5")] * 2)

    def signalled_write(self: Any, *args: Any) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)     # the handler would run right here
        write(self, *args)
    wsgi._Recorder._write = signalled_write
    try:
        with pytest.raises(SystemExit):
            flush_requests()
    finally:
        wsgi._Recorder._write = write
    written = _file_values(mp, os.getpid(), "signalled")
    assert _requests_written(mp, os.getpid(), "signalled") == 2
    assert written[("hostsvc_http_response_size_bytes_sum", "{}")] == 10


def test_without_a_flusher_thread_requests_are_still_served_and_counted(
        tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    """A process out of threads: the requests write every 256th request, and the
    exit flush writes the rest."""
    _in_child(lambda: _no_thread(tmp_path, monkeypatch, caplog), tmp_path)


def _no_thread(mp: Path, monkeypatch: Any, caplog: Any) -> None:
    def refuse(self: Any) -> None:
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", refuse)
    app = instrument("threadless", _app)
    _drive(app, [("GET", "/200", "1")] * 255 + [("HEAD", "/200", "")])
    assert _requests_written(mp, os.getpid(), "threadless") == 256
    _drive(app, [("GET", "/200", "1")] * 3 + [("", "/200", "1")])
    assert _requests_written(mp, os.getpid(), "threadless") == 256
    flush_requests()
    assert _requests_written(mp, os.getpid(), "threadless") == 260
    assert _codes_written(mp, "threadless") == {"200": 260}
    assert "no flusher thread (can't start new thread)" in caplog.text


def test_a_library_without_the_histogram_values_leaves_requests_served(
        tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    _in_child(lambda: _broken_library(monkeypatch, caplog), tmp_path)


def _broken_library(monkeypatch: Any, caplog: Any) -> None:
    from prometheus_client import Histogram

    made = Histogram._metric_init

    def renamed(self: Any) -> None:     # as a release that renamed a histogram's sum
        made(self)
        self._total = self.__dict__.pop("_sum")
    monkeypatch.setattr(Histogram, "_metric_init", renamed)
    seen = []
    app = instrument("broken", lambda environ, start_response: (
        seen.append(environ["PATH_INFO"]), start_response("200 OK", []), [b"ok"])[2])
    for path in ("/a", "/b"):
        assert app({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *a: None) == [b"ok"]
    assert seen == ["/a", "/b"]
    errors = [r for r in caplog.records
              if r.getMessage().startswith("request metrics of broken are off")]
    assert len(errors) == 1 and "does not keep _sum, _buckets" in caplog.text


# -- the supervisor's endpoints ---------------------------------------------------------
def test_upstream_error_endpoint_counts_under_the_app(server_for: Any) -> None:
    srv = server_for(lambda: {"started_at": 0.0, "apps": {"delta": {"state": "backoff"}}})
    status, headers, body = get(srv.port, "/_hostsvc/upstream-error/delta/502", "POST")
    assert (status, headers["Retry-After"]) == (503, "5") and b"not running" in body
    assert get(srv.port, "/_hostsvc/upstream-error/delta/504")[0] == 504
    assert get(srv.port, "/_hostsvc/upstream-error/delta/502", "PURGE")[0] == 503
    assert get(srv.port, "/_hostsvc/upstream-error/nosuchapp/502")[0] == 404
    assert get(srv.port, "/_hostsvc/upstream-error/delta/500")[0] == 404
    samples = scrape(srv)
    assert value(samples, "hostsvc_proxy_errors_total", app="delta", code="502") == 2
    assert value(samples, "hostsvc_proxy_errors_total", app="delta", code="504") == 1
    assert requests_by(samples, "delta") == {("POST", "503"): 1, ("GET", "504"): 1,
                                             ("other", "503"): 1}
    assert value(samples, "hostsvc_app_ready", app="delta") == 0


def test_healthz_readyz_and_reload_metrics(server_for: Any) -> None:
    state: dict[str, Any] = {
        "started_at": 1000.0,
        "apps": {"a": {"state": "running", "workers": 1, "worker_pids": []},
                 "b": {"state": "backoff", "workers": 1, "worker_pids": [], "restarts": 2},
                 "c": {"state": "stopped", "workers": 1, "worker_pids": []}},
        "reloads": {"ok": 2, "failed": 1, "last_success": 2000.0}}
    srv = server_for(lambda: state)
    assert get(srv.port, "/healthz")[::2] == (200, b"ok\n")
    status, _, body = get(srv.port, "/readyz")
    assert (status, json.loads(body)) == (503, {"ready": False, "not_ready": ["b"]})
    samples = scrape(srv)
    assert value(samples, "hostsvc_config_reloads_total", result="success") == 2
    assert value(samples, "hostsvc_config_reloads_total", result="failure") == 1
    assert value(samples, "hostsvc_config_last_reload_success_timestamp_seconds") == 2000.0
    assert value(samples, "hostsvc_pool_restarts_total", app="b") == 2
    assert value(samples, "hostsvc_pool_memory_rss_bytes", app="b") == 0
    build = [dict(k[1]) for k in samples if k[0] == "hostsvc_build_info"]
    assert len(build) == 1 and build[0]["python"] == ".".join(map(str, sys.version_info[:3]))
    # b is replaced by a reload (a new app state: its restart count starts again at 0):
    # the exported counter must not drop.
    state["apps"]["b"] = {"state": "running", "workers": 1, "worker_pids": [], "restarts": 0}
    assert value(scrape(srv), "hostsvc_pool_restarts_total", app="b") == 2
    status, _, body = get(srv.port, "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "not_ready": []})
    assert get(srv.port, "/nope")[0] == 404
    assert get(srv.port, "/metrics", "POST")[0] == 405


def test_openmetrics_negotiation(server_for: Any) -> None:
    srv = server_for(lambda: {"started_at": 0.0, "apps": {}})
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = get(srv.port, "/metrics", headers={"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"hostsvc_build_info", "hostsvc_config_reloads"} <= names
    status, headers, _ = get(srv.port, "/metrics", headers={"Accept": "text/plain"})
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")


# -- nginx: stub_status and the upstream-error routing phase 2 will render ---------------
NGINX_CONF = """daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {d}/client_body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    access_log off;
    upstream app_gamma {{ server unix:{d}/missing.sock fail_timeout=0; }}
    server {{
        listen 127.0.0.1:{port};
        location = /nginx_status {{ stub_status; allow 127.0.0.1; deny all; }}
        location /gamma/ {{
            set $hostsvc_app gamma;
            proxy_pass http://app_gamma;
            error_page 502 503 504 = @hostsvc_upstream_error;
        }}
        location @hostsvc_upstream_error {{
            proxy_pass http://127.0.0.1:{metrics}/_hostsvc/upstream-error/$hostsvc_app/$upstream_status;
        }}
    }}
}}
"""


def test_nginx_stub_status_and_upstream_errors(server_for: Any, tmp_path: Path) -> None:
    srv = server_for(lambda: {"started_at": 0.0, "apps": {"gamma": {"state": "failed"}}},
                     nginx_status_url=None)
    port = free_port()
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(d=tmp_path, port=port,
                                                           metrics=srv.port))
    proc = subprocess.Popen([nginx_binary(), "-p", str(tmp_path), "-c",
                             str(tmp_path / "nginx.conf"), "-e", "stderr"],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: get_or_none(port, "/nginx_status"), what="nginx to listen")
        for _ in range(3):
            status, _, body = get(port, "/gamma/page")
            assert status == 503 and b"not running" in body
        url = f"http://127.0.0.1:{port}/nginx_status"
        with_nginx = server_for(srv.state, nginx_status_url=url)
        samples = scrape(with_nginx)
        assert value(samples, "nginx_up") == 1
        assert value(samples, "nginx_http_requests_total") >= 5
        assert value(samples, "nginx_connections_accepted") >= 5
        assert value(samples, "nginx_connections_handled") >= 5
        assert value(samples, "nginx_connections_active") >= 1
        for key in ("reading", "writing", "waiting"):
            assert value(samples, f"nginx_connections_{key}") is not None
        assert value(samples, "hostsvc_proxy_errors_total", app="gamma", code="502") == 3
        assert requests_by(samples, "gamma") == {("GET", "503"): 3}
    finally:
        proc.terminate()
        proc.wait(10)
    dead = scrape(server_for(srv.state, nginx_status_url=url))
    assert value(dead, "nginx_up") == 0 and value(dead, "nginx_connections_active") is None


def get_or_none(port: int, path: str) -> int | None:
    try:
        return get(port, path)[0]
    except OSError:
        return None


# -- churn: 500 dead workers leave a bounded directory and a small scrape -----------------
def test_500_worker_restarts_keep_dir_and_scrape_bounded(server_for: Any, tmp_path: Path
                                                         ) -> None:
    churn = str(tmp_path / "mp")
    os.mkdir(churn)
    app = instrument("churn", lambda environ, start_response: (
        start_response("200 OK", []), [b"hello"])[1])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    t0 = time.monotonic()
    for _ in range(500):
        pid = os.fork()
        if pid == 0:                     # a worker: 3 requests, then it dies
            try:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = churn
                for _ in range(3):
                    app(dict(environ), lambda *a: None)
                flush_requests()         # what a worker's exit does (not os._exit)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        archive_process(pid, churn)      # what child_exit does in the arbiter
    print(f"\n500 worker lifetimes in {time.monotonic() - t0:.1f}s")
    files = sorted(os.listdir(churn))
    assert files == ["archive.lock", "counter_archive.db", "histogram_archive.db"]
    srv = server_for(lambda: {"started_at": 0.0, "apps": {}}, multiproc_path=churn)
    t1 = time.monotonic()
    samples = scrape(srv)
    status, _, body = get(srv.port, "/metrics")
    print(f"scrape after churn: {len(body)} bytes, {len(samples)} samples, "
          f"{(time.monotonic() - t1) * 1000:.1f} ms for two scrapes")
    assert requests_by(samples, "churn") == {("GET", "200"): 1500}
    assert value(samples, "hostsvc_http_request_duration_seconds_count", app="churn",
                 method="GET") == 1500
    assert value(samples, "hostsvc_http_requests_in_flight", app="churn") is None
    assert len(body) < 20_000


def test_merge_killed_midway_is_finished_by_the_next_one(server_for: Any, tmp_path: Path
                                                         ) -> None:
    """An arbiter killed after moving the merged archive in place but before removing
    the merged files must not leave their counts in twice: the journal lets the next
    merger (here: the scrape's sweep) finish the job."""
    mp = str(tmp_path / "mp")
    os.mkdir(mp)
    app = instrument("journal", lambda environ, start_response: (
        start_response("200 OK", []), [b"x"])[1])
    workers = []
    for _ in range(2):                   # two workers, 3 requests each
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp
                for _ in range(3):
                    app({"REQUEST_METHOD": "GET"}, lambda *a: None)
                flush_requests()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        workers.append(pid)
    archive_process(workers[0], mp)
    arbiter = os.fork()
    if arbiter == 0:                     # merges the second worker, dies mid-way
        real_unlink = os.unlink

        def unlink_then_die(path: str) -> None:
            if os.path.basename(path) == f"counter_{workers[1]}.db":
                os.kill(os.getpid(), signal.SIGKILL)
            real_unlink(path)
        os.unlink = unlink_then_die      # only in this forked child
        archive_process(workers[1], mp)
        os._exit(0)
    _, status = os.waitpid(arbiter, 0)
    assert os.WIFSIGNALED(status)
    left = set(os.listdir(mp))
    assert {"archive.journal", "counter_archive.db", f"counter_{workers[1]}.db"} <= left
    srv = server_for(lambda: {"started_at": 0.0, "apps": {}}, multiproc_path=mp)
    assert requests_by(scrape(srv), "journal") == {("GET", "200"): 6}
    assert sorted(os.listdir(mp)) == ["archive.lock", "counter_archive.db",
                                      "histogram_archive.db"]


# -- deploy/ and docs/ use exactly the exported names -------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "offset", "and", "or", "unless", "inf", "nan", "le"}


def metric_names_in(expr: str) -> set[str]:
    """Identifiers of a PromQL expression that name metrics (not functions or labels)."""
    expr = re.sub(r"label_values\(\s*([^,)]*)[^)]*\)", r"\1", expr)   # Grafana's
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                           # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                  "", expr)                                          # label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)                          # ranges
    expr = re.sub(r"\$\{?\w+\}?", "", expr)                         # Grafana variables
    found = set()
    for m in re.finditer(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr):
        word = m.group(0)
        if word.lower() not in PROMQL_WORDS:
            found.add(word)
    return found


def _alert_exprs() -> list[str]:
    import yaml

    doc = yaml.safe_load((ROOT / "deploy/prometheus/hostsvc-alerts.yaml").read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    doc = json.loads((ROOT / "deploy/grafana/hostsvc-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] if isinstance(v["query"], str) else v["query"]["query"]
              for v in doc.get("templating", {}).get("list", []) if v.get("type") == "query"]
    return exprs


def test_alerts_and_dashboard_use_only_exported_names() -> None:
    exported = exported_names()
    alerts, dashboard = _alert_exprs(), _dashboard_exprs()
    assert len(alerts) >= 4 and len(dashboard) >= 10
    used = set()
    for expr in alerts + dashboard:
        names = metric_names_in(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} uses unknown {sorted(names - exported)}"
        used |= names
    unused = [s.name for s in SPECS
              if not any(n == s.name or n.startswith(s.name + "_") for n in used)]
    assert not unused, f"on no dashboard panel nor alert: {unused}"
    # The checker itself catches a misspelt name, wherever it hides.
    assert metric_names_in('sum by (app) (rate(hostsvc_http_request_total{code=~"5.."}[5m]))'
                           ' / on (app) nginx_up') == {"hostsvc_http_request_total", "nginx_up"}


@pytest.mark.parametrize("doc", ["docs/metrics.md", "README.md"])
def test_docs_list_every_metric(doc: str) -> None:
    text = (ROOT / doc).read_text()
    missing = [s.name for s in SPECS if f"`{s.name}`" not in text]
    assert not missing, f"{doc} does not list {missing}"


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (apt-get install -y prometheus)")
        pytest.skip("promtool not installed (apt-get install -y prometheus); "
                    "CI fails instead of skipping")
    return found


def test_promtool_checks_rules_and_exposition(server_for: Any) -> None:
    promtool = _promtool()
    proc = subprocess.run([promtool, "check", "rules",
                           str(ROOT / "deploy/prometheus/hostsvc-alerts.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srv = server_for(lambda: {"started_at": 0.0, "apps": {"a": {"state": "running"}}})
    get(srv.port, "/_hostsvc/upstream-error/a/502")
    body = get(srv.port, "/metrics")[2]
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
