"""What instrument() costs per request (issue #4): a hello WSGI app called in-process.

No server and no sockets, so the difference between the rows is the middleware alone:
a counter, three histogram observations and an in-flight inc/dec in prometheus-client's
multiprocess mode (mmap files in a temporary PROMETHEUS_MULTIPROC_DIR), as in a gunicorn
worker, on instrument()'s fast path and, for comparison, through prometheus_client's
public API (HOSTSVC_METRICS_FAST=0). Requests are made and timed by bench/web.py's
helpers (fresh environ, body iterated and closed, best of several rounds). Compare
numbers of one run only. A real worker pays about three times these figures: each of
its requests finds the CPU caches cold (docs/metrics.md).

    .venv/bin/python bench/metrics_overhead.py [--seconds 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]

import apps  # noqa: E402  (bench/ is not a package)
import web  # noqa: E402

from hostsvc.metrics import instrument, prepare_multiproc_dir  # noqa: E402


def hello_streamed(environ: dict[str, Any], start_response: Callable[..., Any]
                   ) -> Iterator[bytes]:
    """A generator body: instrument() must wrap it to count bytes as they are sent."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"Hello, "
    yield b"world!"


def with_request_start(app: apps.WSGIApp) -> apps.WSGIApp:
    """Adds the header nginx sets, so the queue-time observation is part of the cost."""
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ["HTTP_X_REQUEST_START"] = f"t={time.time():.3f}"
        return app(environ, start_response)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per timing round")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="hostsvc-metrics-bench-")
    try:
        prepare_multiproc_dir(tmp)
        from prometheus_client import Counter, Histogram

        counter = Counter("bench_total", "a bare counter", registry=None)
        histogram = Histogram("bench_seconds", "a bare histogram", registry=None)
        inc = web.time_per_call_us(counter.inc, args.seconds)
        observe = web.time_per_call_us(lambda: histogram.observe(0.01), args.seconds)
        print(f"for scale, now on this machine: counter inc {inc:.2f} us, histogram "
              f"observe {observe:.2f} us; instrument() does 1 inc, 3 observes and an "
              f"inc/dec pair per request (~{3 * inc + 3 * observe:.1f} us)")
        rows = (("hello, list body", apps.raw_hello, "1"),
                ("hello, streamed body", hello_streamed, "1"),
                ("list body, public API", apps.raw_hello, "0"))
        for label, app, fast in rows:
            os.environ["HOSTSVC_METRICS_FAST"] = fast    # read when the first call binds
            bare = web.time_per_call_us(web.make_caller(with_request_start(app), "/"),
                                        args.seconds)
            wrapped = web.time_per_call_us(
                web.make_caller(with_request_start(instrument(label, app)), "/"),
                args.seconds)
            print(f"{label:22s} bare {bare:6.2f} us  instrumented {wrapped:6.2f} us  "
                  f"overhead {wrapped - bare:6.2f} us/request")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
