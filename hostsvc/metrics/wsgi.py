"""`instrument()`: the WSGI middleware that counts and times requests inside a worker.

Why requests are written in batches: in a real worker every request finds the CPU caches
cold from the server's and the kernel's work, and Python code there costs several times
what a tight loop shows. Writing each request's nine values (a counter, three histograms
of two values each, the in-flight gauge up and down) into prometheus_client's mmap files
as it ended cost 6.5-7.5 us per request in a gunicorn worker, even written in place
(28.6k instructions). So a request only draws a number from a counter as it begins and
appends a tuple of what it saw as it ends (`_Recorder.pending`); the tuples are summed
and written through prometheus_client's own value objects in batches: by the request
that ends a batch of about FLUSH_BATCH, or by a flusher thread every FLUSH_INTERVAL. A
batch runs warm and writes each series once, however many requests it holds (10.4k
instructions per request in all for a hostsvc.web app; docs/metrics.md has the
measurements).

What that costs in accuracy: a scrape sees a request up to FLUSH_INTERVAL after it
ended (Prometheus scrapes every 15-60 s), and a worker that is SIGKILLed (or
OOM-killed, or crashes in C) loses what it had not written yet: at most FLUSH_INTERVAL's
worth of requests, or about FLUSH_BATCH under load. A worker that exits through Python
(a graceful stop, max_requests, a sync worker's timeout abort, an exception) writes the
rest as it exits.

The children are created on a worker's first request, never in the pool's main
process: with preload the middleware is built there, and a value touched there would
leave a file of that process behind for nothing.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import math
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from bisect import bisect_left, bisect_right
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from ..statusline import status_environ_key
from .spec import mp_metrics

log = logging.getLogger("hostsvc.metrics")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Anything else is counted as "other", so a client cannot grow the series count.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# The request that draws a multiple of FLUSH_BATCH from the start counter writes the
# queue (each flush draws one number too): about every FLUSH_BATCH requests under load.
FLUSH_BATCH = 256
FLUSH_MASK = FLUSH_BATCH - 1
assert FLUSH_BATCH & FLUSH_MASK == 0, "FLUSH_BATCH must be a power of two"
FLUSH_INTERVAL = 0.25      # seconds: the longest an ended request waits to be written
# Where an app without a status_environ_key of its own has its status line kept.
STATUS_KEY = "hostsvc.metrics.status"
ERROR_LOG_INTERVAL = 60.0  # seconds between two logged failures of one recorder

INF = float("inf")
# A queue time of a day or more, or below -1 s, comes from a header or a clock gone
# wrong: not observed. Between -1 s and 0 it is nginx's $msec (in ms, cached per
# event-loop turn) running behind the worker's clock: observed as 0.
MAX_QUEUE = 86400.0
MIN_QUEUE = -1.0
# Signals whose Python handlers (gunicorn's exit, abort and reload handlers) would
# interrupt a batch being written in the main thread: held back until it is written.
DEFERRED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP,
                              signal.SIGABRT, signal.SIGUSR1, signal.SIGUSR2,
                              signal.SIGALRM, signal.SIGCHLD, signal.SIGWINCH,
                              signal.SIGTTIN, signal.SIGTTOU})

# One ended request as the request path queues it: method, status line (None if the
# app never called start_response), perf_counter() at its start and end, the raw
# X-Request-Start header (or None), response body bytes.
Record = tuple[str, "str | None", float, float, "str | None", int]

_RECORDERS: list[_Recorder] = []       # every instrument() of this process
_exit_hooks_pid: int | None = None     # the process that registered flush_requests()


def flush_requests(timeout: float = 2.0) -> None:
    """Write what every instrumented app in this process has queued. Runs by itself at
    process exit (atexit, or a multiprocessing child's finalizers); call it before an
    exit that skips them (os._exit) to keep those requests."""
    for recorder in _RECORDERS:
        if recorder.running:
            recorder.flush(timeout=timeout)


class _Recorder:
    """One app's request metrics in one process: what requests leave on their way, and
    the batches that write it to prometheus_client's files."""

    def __init__(self, app_name: str) -> None:
        _RECORDERS.append(self)
        self.app_name = app_name
        # next() is atomic, as are deque's append and popleft: gthread workers' request
        # threads need no lock on the request path.
        self.began = itertools.count()     # next() as each request begins
        self.pending: deque[Record] = deque()
        self.push = self.pending.append
        self.running = False     # this process has bound its children and its flusher
        self.broken = False      # binding failed: no request metrics in this process
        self._reset_counts()
        self._counters: dict[tuple[str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._last_error = -ERROR_LOG_INTERVAL
        # A fork waits for a batch being written: the child would otherwise inherit
        # prometheus_client's lock (one per process, never reset) held by the flusher
        # thread, and hang at its first metric write.
        os.register_at_fork(before=self._flushing_lock_acquire,
                            after_in_parent=self._flushing_lock_release,
                            after_in_child=self._forked)

    def _reset_counts(self) -> None:
        self._own_reads = 0      # next(self.began) calls the flushes made
        self._began_written = 0  # request starts already added to the in-flight gauge
        self._flushing = threading.Lock()
        self._starting = threading.Lock()

    # (Not the lock's own methods: a fork child gets a new lock, see _reset_counts.)
    def _flushing_lock_acquire(self) -> None:
        self._flushing.acquire()

    def _flushing_lock_release(self) -> None:
        self._flushing.release()

    def start(self) -> bool:
        """On a process's first request: bind the app's children, start the flusher
        thread, and write what is left when the process exits. False: request metrics
        are off in this process (logged once), the app serves without them."""
        with self._starting:
            if self.running or self.broken:
                return self.running
            try:
                m = mp_metrics()
                self._requests = m["hostsvc_http_requests_total"]
                self._duration = m["hostsvc_http_request_duration_seconds"]
                self._in_flight = m["hostsvc_http_requests_in_flight"].labels(self.app_name)
                self._queue = _histogram(
                    m["hostsvc_http_request_queue_seconds"].labels(self.app_name))
                self._size = _histogram(
                    m["hostsvc_http_response_size_bytes"].labels(self.app_name))
            except Exception:  # noqa: BLE001 - serve the requests without metrics
                self.broken = True
                log.exception("request metrics of %s are off in worker %d",
                              self.app_name, os.getpid())
                return False
            try:
                threading.Thread(target=self._flush_periodically, daemon=True,
                                 name=f"hostsvc-metrics-{self.app_name}").start()
            except RuntimeError as exc:     # the process or cgroup is out of threads
                log.warning("request metrics of %s in worker %d: no flusher thread (%s); "
                            "batches are written by requests and at exit only",
                            self.app_name, os.getpid(), exc)
            _flush_at_exit()
            self.running = True
            return True

    def _forked(self) -> None:
        """In a child forked from this process: what was queued and begun is the
        parent's to write, and no flusher runs here (the child's first request starts
        one; prometheus_client, seeing a new pid, gives the child files of its own)."""
        self.pending.clear()
        self.began = itertools.count()
        self.running = self.broken = False
        self._reset_counts()

    def _flush_periodically(self) -> None:
        # Signals go to a thread that does not block them, and the main thread blocks
        # these while it writes a batch: this thread must not take them either.
        signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
        while True:
            time.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self, wait: bool = True, timeout: float = -1) -> None:
        """Write what requests left since the last flush. With wait=False, return at
        once if another thread is writing."""
        if not self._flushing.acquire(wait, timeout):
            return
        try:
            if threading.current_thread() is threading.main_thread():
                # gunicorn's handlers of these end a sync worker with sys.exit() in the
                # main thread: mid-batch, they would lose the records taken so far.
                # (Python runs handlers in the main thread only, so a batch written in
                # another thread cannot be cut short this way.)
                held = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
                try:
                    self._flush()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
            else:
                self._flush()
        finally:
            self._flushing.release()

    def _flush(self) -> None:
        try:
            n = len(self.pending)      # first: each of these records' starts is counted
            began = next(self.began) - self._own_reads
            self._own_reads += 1
            # The gauge first and the records after: if a batch fails half-way, its
            # requests are lost but nothing stays in flight for good.
            in_flight = began - self._began_written - n
            self._began_written = began
            if in_flight:
                self._in_flight.inc(in_flight)
            if n:
                self._collect(n)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            now = time.monotonic()
            if now - self._last_error >= ERROR_LOG_INTERVAL:
                self._last_error = now
                log.exception("writing request metrics of %s failed; that batch is lost "
                              "(logged at most once a minute)", self.app_name)

    def _collect(self, n: int) -> None:
        """Take the first `n` queued records apart into the values each metric needs,
        and have them written. Flush lock held.

        This loop is what a batch costs per request, so it does no more than file
        each record's values into plain lists and dicts; the sums and buckets are made
        once per batch (_write)."""
        pop = self.pending.popleft
        offset = time.time() - time.perf_counter()    # perf_counter() -> unix time
        # method -> ({status line: requests}, [durations])
        by_method: dict[str, tuple[dict[Any, int], list[float]]] = {}
        sizes: list[int] = []
        queued: list[float] = []
        header_seen, started_at = None, 0.0
        for _ in range(n):
            method, status, started, ended, header, nbytes = pop()
            per_method = by_method.get(method)
            if per_method is None:
                per_method = by_method[method] = ({}, [])
            codes, durations = per_method
            codes[status] = codes.get(status, 0) + 1
            durations.append(ended - started)
            sizes.append(nbytes)
            if header is not None:
                # Under load many requests share nginx's $msec (cached per event-loop
                # turn): parse each header once.
                if header != header_seen:
                    header_seen, started_at = header, _perf_counter_at(header, offset)
                queued.append(started - started_at)
        self._write(by_method, sizes, queued)

    def _write(self, by_method: dict[str, tuple[dict[Any, int], list[float]]],
               sizes: list[int], queued: list[float]) -> None:
        """Add a batch to the files through prometheus_client's value objects, once per
        series, taking the library's lock and checking the pid as observe() does. Each
        histogram's values are sorted (C compares floats fast) and its buckets counted
        with a bisect each."""
        durations: dict[str, list[float]] = {}
        for method, (codes, values) in by_method.items():
            method = method if method in KNOWN_METHODS else "other"
            for status, count in codes.items():
                # A status that is not a str (an app's mistake) fails the request
                # in the server: 500, as an app that never called start_response.
                code = status[:3] if type(status) is str and status else "500"
                self._counter(method, code).inc(count)
            durations.setdefault(method, []).extend(values)
        for method, values in durations.items():
            _observe_sorted(self._histogram_for(method), sorted(values))
        queued.sort()           # then: below MIN_QUEUE | behind (0) | observed | bad
        low, zero, high = (bisect_left(queued, v) for v in (MIN_QUEUE, 0.0, MAX_QUEUE))
        _observe_sorted(self._queue, [0.0] * (zero - low) + queued[zero:high])
        _observe_sorted(self._size, sorted(sizes))

    def _counter(self, method: str, code: str) -> Any:
        child = self._counters.get((method, code))
        if child is None:
            child = self._counters[(method, code)] = self._requests.labels(
                self.app_name, method, code, code[:1] + "xx")
        return child

    def _histogram_for(self, method: str) -> Any:
        child = self._durations.get(method)
        if child is None:
            child = self._durations[method] = _histogram(
                self._duration.labels(self.app_name, method))
        return child


def _flush_at_exit() -> None:
    """Have this process run flush_requests() as it exits, once per process."""
    global _exit_hooks_pid
    if _exit_hooks_pid == os.getpid():
        return
    _exit_hooks_pid = os.getpid()
    if multiprocessing.parent_process() is not None:
        # A multiprocessing child (granian's workers) ends with os._exit after running
        # these finalizers, not atexit's handlers.
        multiprocessing.util.Finalize(None, flush_requests, exitpriority=10)
    else:
        atexit.register(flush_requests)


def _histogram(child: Any) -> Any:
    """`child`, checked to keep the values `_observe_sorted` writes to.

    Adding a batch needs a histogram child's values (`_sum`, one per bucket in
    `_buckets`, bounds in `_upper_bounds`), which prometheus_client's public API does
    not expose: it observes one value at a time. Raises if they are not as known, so a
    library that changed them fails loudly at a worker's first request (logged; the
    requests are served) instead of miscounting."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    if not bounds or bounds[-1] != INF or len(buckets or ()) != len(bounds) or \
            not hasattr(getattr(child, "_sum", None), "inc"):
        raise RuntimeError("prometheus_client's Histogram does not keep _sum, _buckets "
                           "and _upper_bounds as hostsvc expects")
    return child


def _observe_sorted(child: Any, values: list[float]) -> None:
    """Add sorted `values` to a histogram child: what one observe() per value would
    have written, one write per bucket that gets any."""
    if not values:
        return
    child._sum.inc(sum(values))
    below = 0
    for bucket, bound in zip(child._buckets, child._upper_bounds):
        upto = bisect_right(values, bound, below)      # observe(): value <= bound
        if upto > below:
            bucket.inc(upto - below)
            below = upto


def _perf_counter_at(header: str, offset: float) -> float:
    """The perf_counter() reading at nginx's "t=<unix seconds>", or -Inf for a header
    that is not one (its queue time, +Inf, is dropped). The prefix is not compared:
    anything else fails float() or gives a queue time outside [MIN_QUEUE, MAX_QUEUE)."""
    try:
        stamp = float(header[2:])
    except (TypeError, ValueError):
        return -INF
    return stamp - offset if math.isfinite(stamp) else -INF


class _CountingBody:
    """Wraps a streamed body: counts bytes as they go and records on close()."""

    __slots__ = ("body", "recorder", "method", "environ", "status_key", "started",
                 "header", "number", "size", "done")

    def __init__(self, body: Iterable[bytes], recorder: _Recorder, method: str,
                 environ: dict[str, Any], status_key: str, started: float,
                 header: str | None, number: int) -> None:
        self.body = body
        self.recorder = recorder
        self.method = method
        self.environ = environ              # where the status line is, once it is known
        self.status_key = status_key
        self.started = started
        self.header = header
        self.number = number
        self.size = 0
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            self.size += len(chunk)
            yield chunk

    def close(self) -> None:
        """PEP 3333: the server calls close(); pass it on, then record the request."""
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            if not self.done:
                self.done = True
                recorder = self.recorder
                recorder.push((self.method, self.environ.get(self.status_key), self.started,
                               time.perf_counter(), self.header, self.size))
                if not self.number & FLUSH_MASK:
                    recorder.flush(wait=False)


def instrument(app_name: str, wsgi_app: WSGIApp) -> WSGIApp:
    """Wrap `wsgi_app` so every request is counted, timed and sized under `app_name`.

    Queue time comes from nginx's `X-Request-Start: t=<unix seconds with ms>` header
    (hostsvc's nginx sets it to `$msec`); requests without it are not observed there.
    An exception from the app is recorded as a 500 (what the server will answer) and
    re-raised.

    The status line is read from the environ: where the app leaves it, if it does
    (hostsvc.statusline: hostsvc.web's Application and hostsvc's mount around one);
    any other app's start_response is wrapped to put it there.
    """
    recorder = _Recorder(app_name)
    push = recorder.push
    clock = time.perf_counter
    status_key = status_environ_key(wsgi_app)
    wrap = not status_key
    if wrap:
        status_key = STATUS_KEY

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]
                   ) -> Iterable[bytes]:
        started = clock()
        if not recorder.running and not recorder.start():
            return wsgi_app(environ, start_response)
        number = next(recorder.began)
        method = environ.get("REQUEST_METHOD", "GET")
        header = environ.get("HTTP_X_REQUEST_START")
        try:
            # A generator app calls start_response only when the server first
            # iterates its body: a streamed body reads the status at close.
            if wrap:
                # (Bound as defaults, not closed over: a closure would make environ
                # and start_response cells, which every request pays for.)
                def keeping_start_response(status_line: str, headers: list[tuple[str, str]],
                                           exc_info: Any = None, environ: Any = environ,
                                           start_response: Any = start_response) -> Any:
                    environ[STATUS_KEY] = status_line
                    return start_response(status_line, headers, exc_info)
                body = wsgi_app(environ, keeping_start_response)
            else:
                body = wsgi_app(environ, start_response)
        except BaseException:
            # BaseException too: a worker aborted for a timeout raises SystemExit here,
            # and gunicorn still answers that request with a 500.
            push((method, "500", started, clock(), header, 0))
            raise
        if type(body) is not list:
            return _CountingBody(body, recorder, method, environ, status_key, started,
                                 header, number)
        push((method, environ.get(status_key), started, clock(), header,
              len(body[0]) if len(body) == 1 else sum(map(len, body))))
        if not number & FLUSH_MASK:
            recorder.flush(wait=False)
        return body

    return middleware
