"""`instrument()`: the WSGI middleware that counts and times requests inside a worker.

Cost matters here (every request pays it), so label children are bound once per
(method, code) and cached; a list or tuple body (the common case) is measured at once
and returned untouched, and only other iterables get a wrapper that counts bytes as the
server pulls them, keeping streamed responses streamed.

The children are created on a worker's first request, never in the arbiter: with
preload_app the middleware is built in the arbiter, and a value touched there would
leave a per-arbiter file behind for nothing.

The fast path: through the public API, every increment takes prometheus_client's
multiprocess lock and checks the pid (a syscall) on its own, nine times per request
(a counter, three histograms of two values each, the in-flight gauge up and down). The
recorder instead takes that same lock once at the start and once at the end of a
request and writes the values as `MmapedValue.inc` does (value, timestamp, mmap
write). Instead of the library's per-write pid check, a fork handler turns the fast path
off in any child forked after binding (the public API then reopens files for the child's
pid, as the library does). It relies on prometheus_client's multiprocess
internals (pinned in requirements.lock); `_fast_lock()` checks each one at bind time and
any mismatch falls back to the public API.
"""
from __future__ import annotations

import os
import time
from bisect import bisect_left
from typing import Any, Callable, Iterable, Iterator

from .spec import mp_metrics

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Anything else is counted as "other", so a client cannot grow the series count.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _fast_lock(value: Any, histogram: Any) -> Any | None:
    """prometheus_client's multiprocess lock if its internals are as this module
    expects (checked on one value and one histogram child), else None."""
    try:
        cls = type(value)
        if not getattr(cls, "_multiprocess", False):
            return None
        inc = cls.inc
        cells = dict(zip(inc.__code__.co_freevars, inc.__closure__ or ()))
        lock = cells["lock"].cell_contents
        for v in (value, histogram._sum, histogram._buckets[0]):
            v._value, v._key, v._file.write_value   # noqa: B018 - attribute checks
        if len(histogram._buckets) != len(histogram._upper_bounds) or \
                histogram._upper_bounds[-1] != float("inf"):
            return None
        if not (hasattr(lock, "__enter__") and hasattr(lock, "__exit__")):
            return None
        return lock
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None


def _add(value: Any, amount: float) -> None:
    """What MmapedValue.inc does under its lock, minus the lock and the pid check."""
    value._value += amount
    value._timestamp = 0.0
    value._file.write_value(value._key, value._value, 0.0)


def _observe(histogram: Any, amount: float) -> None:
    """What Histogram.observe does (sum, then the first bucket >= amount), lock held."""
    _add(histogram._sum, amount)
    _add(histogram._buckets[bisect_left(histogram._upper_bounds, amount)], 1.0)


class _Recorder:
    """The bound label children of one app, filled lazily per (method, code)."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._ready = False
        self.requests: dict[tuple[str, str], Any] = {}
        self.durations: dict[str, Any] = {}
        self.lock: Any = None       # the fast path's lock, None: public API only

    def bind(self) -> None:
        m = mp_metrics()
        self._requests = m["hostsvc_http_requests_total"]
        self._duration = m["hostsvc_http_request_duration_seconds"]
        self.in_flight = m["hostsvc_http_requests_in_flight"].labels(self.app_name)
        self.queue = m["hostsvc_http_request_queue_seconds"].labels(self.app_name)
        self.size = m["hostsvc_http_response_size_bytes"].labels(self.app_name)
        self.lock = _fast_lock(self.in_flight._value, self.queue) \
            if os.environ.get("HOSTSVC_METRICS_FAST", "1") != "0" else None
        if self.lock is not None:
            # The children above opened this process's files; a forked child must not
            # write to them: there, the public API (and its pid check) takes over.
            os.register_at_fork(after_in_child=self._forked)
        self._ready = True

    def _forked(self) -> None:
        self.lock = None

    def start(self, queued: float | None) -> None:
        """A request begins: in flight, and its queue time if nginx stamped it."""
        if not self._ready:
            self.bind()
        lock = self.lock
        if lock is not None:
            with lock:
                _add(self.in_flight._value, 1.0)
                if queued is not None:
                    _observe(self.queue, queued)
            return
        self.in_flight.inc()
        if queued is not None:
            self.queue.observe(queued)

    def finish(self, method: str, status: str, started: float, size: int) -> None:
        """Record one finished request (status is the WSGI status line)."""
        elapsed = time.perf_counter() - started
        code = status[:3]
        counter = self.requests.get((method, code))
        if counter is None:
            counter = self.requests[(method, code)] = self._requests.labels(
                self.app_name, method, code, code[:1] + "xx")
        duration = self.durations.get(method)
        if duration is None:
            duration = self.durations[method] = self._duration.labels(self.app_name, method)
        lock = self.lock
        if lock is not None:
            with lock:
                _add(counter._value, 1.0)
                _observe(duration, elapsed)
                _observe(self.size, size)
                _add(self.in_flight._value, -1.0)
            return
        counter.inc()
        duration.observe(elapsed)
        self.size.observe(size)
        self.in_flight.dec()


class _CountingBody:
    """Wraps a streamed body: counts bytes as they go and records on close()."""

    __slots__ = ("body", "recorder", "method", "status", "started", "size", "done")

    def __init__(self, body: Iterable[bytes], recorder: _Recorder, method: str,
                 status: list[str], started: float) -> None:
        self.body = body
        self.recorder = recorder
        self.method = method
        self.status = status
        self.started = started
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
                self.recorder.finish(self.method, self.status[0] or "500", self.started,
                                     self.size)


def instrument(app_name: str, wsgi_app: WSGIApp) -> WSGIApp:
    """Wrap `wsgi_app` so every request is counted, timed and sized under `app_name`.

    Queue time comes from nginx's `X-Request-Start: t=<unix seconds with ms>` header
    (hostsvc's nginx sets it to `$msec`); requests without it are not observed there.
    An exception from the app is recorded as a 500 (what gunicorn will answer) and
    re-raised.
    """
    recorder = _Recorder(app_name)

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]
                   ) -> Iterable[bytes]:
        started = time.perf_counter()
        queued = None
        header = environ.get("HTTP_X_REQUEST_START")
        if header is not None and header.startswith("t="):
            try:
                queued = max(0.0, time.time() - float(header[2:]))
            except ValueError:
                pass
        recorder.start(queued)
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in KNOWN_METHODS:
            method = "other"
        status = [""]

        def counting_start_response(status_line: str, headers: list[tuple[str, str]],
                                    exc_info: Any = None) -> Callable[[bytes], Any]:
            status[0] = status_line
            return start_response(status_line, headers, exc_info)

        try:
            body = wsgi_app(environ, counting_start_response)
        except BaseException:
            # BaseException too: a worker aborted for a timeout raises SystemExit here,
            # and gunicorn still answers that request with a 500.
            recorder.finish(method, "500", started, 0)
            raise
        if type(body) is list or type(body) is tuple:
            recorder.finish(method, status[0] or "500", started, sum(map(len, body)))
            return body
        return _CountingBody(body, recorder, method, status, started)

    return middleware
