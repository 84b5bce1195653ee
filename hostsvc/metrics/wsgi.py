"""`instrument()`: the WSGI middleware that counts and times requests inside a worker.

Why the request path is in C (`_tally.c`) and the writing in Python: prometheus_client
writes each value into an mmap file under a lock, and a Python middleware that wrote a
request's nine values (a counter, three histograms of two values each, the in-flight
gauge up and down) as it ended cost 6.5-7.5 us per request in a gunicorn worker; batched
in Python it still cost about 10k instructions per request, 7-9 % of the CPU of a
granian stack, whose request path is short. So the middleware is a C object that adds
each request into arrays of counts and sums (its method and status code, its duration,
queue time and size) and nothing else; a thread of the worker takes what accumulated
every FLUSH_INTERVAL and writes it through prometheus_client's own value objects, once
per series, however many requests it holds (docs/metrics.md has the measurements).

What that costs in accuracy: a scrape sees a request up to FLUSH_INTERVAL after it
ended (Prometheus scrapes every 15-60 s), and a worker that is SIGKILLed (or
OOM-killed, or crashes in C) loses what it had not written yet: at most FLUSH_INTERVAL's
worth of requests. A worker that exits through Python (a graceful stop, max_requests, a
sync worker's timeout abort, an exception) writes the rest as it exits.

The metrics' children are bound at a worker's first request, never in the pool's main
process: with preload the middleware is built there, and a value touched there would
leave a file of that process behind for nothing.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable

from ..statusline import status_environ_key
# KNOWN_METHODS: methods counted as such; anything else is counted as "other", so a
# client cannot grow the series count.
from ._tally import KNOWN_METHODS, Tally
from .spec import DURATION_BUCKETS, QUEUE_BUCKETS, SIZE_BUCKETS, mp_metrics

log = logging.getLogger("hostsvc.metrics")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

FLUSH_INTERVAL = 0.25      # seconds: the longest an ended request waits to be written
# Where an app without a status_environ_key of its own has its status line kept.
STATUS_KEY = "hostsvc.metrics.status"
ERROR_LOG_INTERVAL = 60.0  # seconds between two logged failures of one recorder

INF = float("inf")
# Signals whose Python handlers (gunicorn's exit, abort and reload handlers) would
# interrupt a batch being written in the main thread: held back until it is written.
DEFERRED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP,
                              signal.SIGABRT, signal.SIGUSR1, signal.SIGUSR2,
                              signal.SIGALRM, signal.SIGCHLD, signal.SIGWINCH,
                              signal.SIGTTIN, signal.SIGTTOU})

_RECORDERS: list[_Recorder] = []       # every instrument() of this process
_exit_hooks_pid: int | None = None     # the process that registered flush_requests()


def flush_requests(timeout: float = 2.0) -> None:
    """Write what every instrumented app in this process has counted. Runs by itself at
    process exit (atexit, or a multiprocessing child's finalizers); call it before an
    exit that skips them (os._exit) to keep those requests."""
    for recorder in _RECORDERS:
        if recorder.running:
            recorder.flush(timeout=timeout)


class _Recorder:
    """One app's request metrics in one process: the C tally that counts its requests,
    and the batches that write what it counted to prometheus_client's files."""

    def __init__(self, app_name: str, wsgi_app: WSGIApp,
                 clocks: tuple[Callable[[], float], Callable[[], float]] | None = None
                 ) -> None:
        _RECORDERS.append(self)
        self.app_name = app_name
        status_key = status_environ_key(wsgi_app)
        self.tally = Tally(wsgi_app, status_key or STATUS_KEY, not status_key, self.start,
                           (DURATION_BUCKETS, QUEUE_BUCKETS, SIZE_BUCKETS), clocks)
        self.running = False     # this process has bound its children and its flusher
        self.broken = False      # binding failed: no request metrics in this process
        self._reset_locks()
        self._counters: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, Any] = {}
        self._last_error = -ERROR_LOG_INTERVAL
        # A fork waits for a batch being written: the child would otherwise inherit
        # prometheus_client's lock (one per process, never reset) held by the flusher
        # thread, and hang at its first metric write.
        os.register_at_fork(before=self._flushing_lock_acquire,
                            after_in_parent=self._flushing_lock_release,
                            after_in_child=self._forked)

    def _reset_locks(self) -> None:
        self._flushing = threading.Lock()
        self._starting = threading.Lock()

    # (Not the lock's own methods: a fork child gets a new lock, see _reset_locks.)
    def _flushing_lock_acquire(self) -> None:
        self._flushing.acquire()

    def _flushing_lock_release(self) -> None:
        self._flushing.release()

    def start(self) -> bool:
        """The tally calls this before a process's first request: bind the app's
        children, start the flusher thread, and write what is left when the process
        exits. False: request metrics are off in this process (logged once), the app
        serves without them."""
        with self._starting:
            if self.running or self.broken:
                return self.running
            try:
                m = mp_metrics()
                self._requests = m["hostsvc_http_requests_total"]
                self._duration = m["hostsvc_http_request_duration_seconds"]
                self._in_flight = m["hostsvc_http_requests_in_flight"].labels(self.app_name)
                self._queue = _histogram(
                    m["hostsvc_http_request_queue_seconds"].labels(self.app_name),
                    QUEUE_BUCKETS)
                self._size = _histogram(
                    m["hostsvc_http_response_size_bytes"].labels(self.app_name),
                    SIZE_BUCKETS)
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
                            "written every 256 requests and at exit instead",
                            self.app_name, os.getpid(), exc)
                self.tally.on_batch = self._flush_without_waiting
            _flush_at_exit()
            self.running = True
            return True

    def _forked(self) -> None:
        """In a child forked from this process: what was counted and begun is the
        parent's to write, and no flusher runs here (the child's first request starts
        one; prometheus_client, seeing a new pid, gives the child files of its own)."""
        self.tally.reset()
        self.tally.on_batch = None
        self.running = self.broken = False
        self._reset_locks()

    def _flush_periodically(self) -> None:
        # Signals go to a thread that does not block them, and the main thread blocks
        # these while it writes a batch: this thread must not take them either.
        signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
        while True:
            time.sleep(FLUSH_INTERVAL)
            self.flush()

    def _flush_without_waiting(self) -> None:
        self.flush(wait=False)

    def flush(self, wait: bool = True, timeout: float = -1) -> None:
        """Write what requests added since the last flush. With wait=False, return at
        once if another thread is writing."""
        if not self._flushing.acquire(wait, timeout):
            return
        try:
            if threading.current_thread() is threading.main_thread():
                # gunicorn's handlers of these end a sync worker with sys.exit() in the
                # main thread: mid-batch, they would lose the values taken so far.
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
            self._write(*self.tally.take())
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            now = time.monotonic()
            if now - self._last_error >= ERROR_LOG_INTERVAL:
                self._last_error = now
                log.exception("writing request metrics of %s failed; that batch is lost "
                              "(logged at most once a minute)", self.app_name)

    def _write(self, in_flight: int, counts: list[tuple[str, int, int]],
               durations: list[tuple[str, float, tuple[int, ...]]],
               queue: tuple[float, tuple[int, ...]] | None,
               sizes: tuple[float, tuple[int, ...]] | None) -> None:
        """Add what the tally took to the files through prometheus_client's value
        objects, once per series, taking the library's lock and checking the pid as
        observe() does. The gauge first: if a batch fails half-way, its requests are
        lost but nothing stays in flight for good."""
        if in_flight:
            self._in_flight.inc(in_flight)
        for method, code, n in counts:
            self._counter(method, code).inc(n)
        for method, total, buckets in durations:
            _add(self._histogram_for(method), total, buckets)
        if queue is not None:
            _add(self._queue, *queue)
        if sizes is not None:
            _add(self._size, *sizes)

    def _counter(self, method: str, code: int) -> Any:
        child = self._counters.get((method, code))
        if child is None:
            label = str(code)
            child = self._counters[(method, code)] = self._requests.labels(
                self.app_name, method, label, label[0] + "xx")
        return child

    def _histogram_for(self, method: str) -> Any:
        child = self._durations.get(method)
        if child is None:
            child = self._durations[method] = _histogram(
                self._duration.labels(self.app_name, method), DURATION_BUCKETS)
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


def _histogram(child: Any, bounds: tuple[float, ...]) -> Any:
    """`child`, checked to keep the values `_add` writes to, with `bounds`.

    Adding counted buckets needs a histogram child's values (`_sum`, one per bucket in
    `_buckets`, bounds in `_upper_bounds`), which prometheus_client's public API does
    not expose: it observes one value at a time. Raises if they are not as known, so a
    library that changed them fails loudly at a worker's first request (logged; the
    requests are served) instead of miscounting."""
    upper = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    if upper != [*bounds, INF] or len(buckets or ()) != len(upper) or \
            not hasattr(getattr(child, "_sum", None), "inc"):
        raise RuntimeError("prometheus_client's Histogram does not keep _sum, _buckets "
                           "and _upper_bounds as hostsvc expects")
    return child


def _add(child: Any, total: float, counts: tuple[int, ...]) -> None:
    """Add counted observations to a histogram child: what one observe() per value
    would have written, one write per bucket that got any."""
    child._sum.inc(total)
    for bucket, n in zip(child._buckets, counts):
        if n:
            bucket.inc(n)


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
    return _Recorder(app_name, wsgi_app).tally
