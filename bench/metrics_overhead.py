"""What instrument() costs per request (issue #4), in-process, against the obvious way.

No server and no sockets: the hostsvc.web hello tree as hostsvc mounts it (tools.proxy
on) called as a server would (bench/web.py's make_caller), bare and wrapped, in
prometheus-client's multiprocess mode (mmap files in a temporary
PROMETHEUS_MULTIPROC_DIR) as in a worker. The baseline in the same run is the
middleware anyone would write with prometheus_client's public API: per request a counter
inc, three observe() calls and the in-flight gauge up and down, written to the files at
once. instrument() is a C object that adds each request into arrays, which a thread
of the worker writes to the files every 0.25 s (hostsvc/metrics/wsgi.py,
hostsvc/metrics/_tally.c); its timed rows leave those writes to that thread, its
callgrind rows write every 256 calls in the calling thread and count them.

Three measures:
- warm: back-to-back calls, best of 5 rounds. Code and data stay in the CPU caches, as
  they never do in a server.
- cold: before each call, `--cold-mib` MiB are written (not timed), as the server, nginx
  and the kernel do between two requests of a worker; mean of all calls. Closer to
  what a worker pays (docs/metrics.md), and noisier.
- instructions (`--instructions`, needs valgrind): instructions per request counted by
  callgrind, the difference between runs of 2,000 and 6,000 calls with
  PYTHONHASHSEED=0. The same on any load and from run to run: the figure to compare
  two versions of the code by.

    .venv/bin/python bench/metrics_overhead.py [--seconds 1] [--cold-mib 4] [--instructions]

Compare times of one run only.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable, Iterable

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]

import apps  # noqa: E402  (bench/ is not a package)
import web  # noqa: E402

from hostsvc.metrics import instrument, prepare_multiproc_dir  # noqa: E402

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
FLUSH_EVERY = 256    # calls between two writes in the callgrind rows (see run_calls)


def public_api_middleware(app_name: str, wsgi_app: WSGIApp) -> WSGIApp:
    """The baseline: hostsvc's request metrics written per request through
    prometheus_client's public API, as the library documents it."""
    from hostsvc.metrics.spec import mp_metrics

    m = mp_metrics()
    requests, duration = m["hostsvc_http_requests_total"], m["hostsvc_http_request_duration_seconds"]
    in_flight = m["hostsvc_http_requests_in_flight"].labels(app_name)
    queue = m["hostsvc_http_request_queue_seconds"].labels(app_name)
    size = m["hostsvc_http_response_size_bytes"].labels(app_name)
    children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]
                   ) -> Iterable[bytes]:
        started = time.perf_counter()
        in_flight.inc()
        header = environ.get("HTTP_X_REQUEST_START")
        if header is not None:
            queue.observe(max(0.0, time.time() - float(header[2:])))
        status = [""]

        def counting_start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            status[0] = line
            return start_response(line, headers, exc_info)

        body = list(wsgi_app(environ, counting_start_response))
        method, code = environ["REQUEST_METHOD"], status[0][:3]
        pair = children.get((method, code))
        if pair is None:
            pair = children[(method, code)] = (
                requests.labels(app_name, method, code, code[0] + "xx"),
                duration.labels(app_name, method))
        pair[0].inc()
        pair[1].observe(time.perf_counter() - started)
        size.observe(sum(map(len, body)))
        in_flight.dec()
        return body

    return middleware


def cold_us_per_call(call: Callable[[], None], seconds: float, mib: float) -> float:
    """Mean microseconds per call with `mib` MiB written before each (not timed)."""
    scratch = bytearray(int(mib * 2**20))
    lines = len(scratch) // 64
    ones = b"\x01" * lines
    for _ in range(200):
        call()
    clock = time.perf_counter
    spent, n, deadline = 0.0, 0, clock() + seconds
    while clock() < deadline:
        scratch[::64] = ones                    # one write per cache line
        start = clock()
        call()
        spent += clock() - start
        n += 1
    return spent / n * 1e6


def with_request_start(app: WSGIApp) -> WSGIApp:
    """Adds the header nginx sets, so the queue-time observation is part of the cost."""
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ["HTTP_X_REQUEST_START"] = f"t={time.time():.3f}"
        return app(environ, start_response)
    return wrapped


ROWS = ("bare", "public API, per request", "instrument()")


def build_rows() -> dict[str, WSGIApp]:
    app = apps.load("hostsvc-proxied")
    return {"bare": with_request_start(app),
            "public API, per request": with_request_start(
                public_api_middleware("public", app)),
            "instrument()": with_request_start(instrument("instrumented", app))}


def instructions_per_call(row: int) -> float:
    """callgrind's count for 6,000 calls of ROWS[row] minus that for 2,000, per call."""
    counts = []
    for calls in (2000, 6000):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, __file__, "--calls", str(row), str(calls)],
            env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True,
            check=True)
        counts.append(int(re.search(r"Collected : (\d+)", out.stderr).group(1)))
    return (counts[1] - counts[0]) / 4000


def run_calls(row: int, calls: int) -> None:
    """The process callgrind counts: warm-up, then `calls` calls of one row. The
    flusher thread is kept asleep so that the count does not depend on how slowly
    valgrind runs; instead the calls write what they counted every FLUSH_EVERY calls,
    more often than a busy worker's flusher does (every 0.25 s), so the writes are
    counted and not under-counted."""
    from hostsvc.metrics import flush_requests, wsgi

    wsgi.FLUSH_INTERVAL = 3600.0
    call = web.make_caller(build_rows()[ROWS[row]], "/")
    for i in range(300 + calls):
        call()
        if i % FLUSH_EVERY == 0:
            flush_requests()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per timing round")
    parser.add_argument("--cold-mib", type=float, default=4.0,
                        help="MiB written between two calls in the cold rows")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per request with callgrind (~1 min)")
    parser.add_argument("--calls", nargs=2, type=int, metavar=("ROW", "N"),
                        help=argparse.SUPPRESS)     # the process --instructions counts
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="hostsvc-metrics-bench-")
    try:
        prepare_multiproc_dir(tmp)
        if args.calls:
            run_calls(*args.calls)
            return
        rows = build_rows()
        callers = {k: web.make_caller(v, "/") for k, v in rows.items()}
        warm = {k: web.time_per_call_us(c, args.seconds) for k, c in callers.items()}
        # Cold rounds alternate the rows, 5 times, median: the machine moves meanwhile.
        cold: dict[str, list[float]] = {k: [] for k in callers}
        for _ in range(5):
            for k, c in callers.items():
                cold[k].append(cold_us_per_call(c, args.seconds, args.cold_mib))
        cold_us = {k: median(v) for k, v in cold.items()}
        print(f"hostsvc.web hello (tools.proxy on), in-process; cold: {args.cold_mib:g} MiB "
              "written before each call")
        for k in rows:
            extra = ("" if k == "bare" else
                     f"  metrics {warm[k] - warm['bare']:5.2f} / {cold_us[k] - cold_us['bare']:5.2f}")
            print(f"{k:26s} warm {warm[k]:6.2f} us  cold {cold_us[k]:6.2f} us{extra}")
        print(f"instrument() / public API, metrics cost cold: "
              f"{(cold_us['instrument()'] - cold_us['bare']) / (cold_us['public API, per request'] - cold_us['bare']):.2f}x")
        if args.instructions:
            counted = [instructions_per_call(i) for i in range(len(ROWS))]
            for name, n in zip(ROWS, counted):
                extra = "" if name == "bare" else f"  metrics {n - counted[0]:8.0f}"
                print(f"{name:26s} instructions per request {n:8.0f}{extra}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
