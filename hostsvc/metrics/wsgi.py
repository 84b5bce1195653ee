"""`instrument()`: the WSGI middleware that counts and times requests inside a worker.

Cost matters here (every request pays it), so label children are bound once per
(method, code) and cached; a list or tuple body (the common case) is measured at once
and returned untouched, and only other iterables get a wrapper that counts bytes as the
server pulls them, keeping streamed responses streamed.

The children are created on a worker's first request, never in the arbiter: with
preload_app the middleware is built in the arbiter, and a value touched there would
leave a per-arbiter file behind for nothing.

The fast path: the public API takes prometheus_client's multiprocess lock and checks the
pid (a syscall) on every write, and each write goes through three Python calls to pack
two doubles into the mmap; a request makes nine (a counter, three histograms of two
values each, the in-flight gauge up and down). In a real worker every request finds the
CPU caches cold from gunicorn's and the kernel's work, and Python code there costs about
three times what a tight in-process loop shows, so the only lever is doing less. The
recorder locates each value in the library's mmap once, at bind time; per request it
takes the library's lock twice (start, end) and adds to each value in place through a
memoryview of doubles: `view[i] += x` is one aligned 8-byte read and write, so a
concurrent scrape sees the old or the new value (struct.pack_into would zero the bytes
first). The library's own copy of each value (`_value`) is then stale in this process;
only the public API reads it, and a process returns to that only through fork: a fork
handler hands a child forked after binding to the public API, which, seeing a new pid,
opens the child's own files and reads its values from them. This relies on
prometheus_client's multiprocess internals (pinned in requirements.lock); `bind()`
checks them (the lock, each value's key right before its offset in the file, the
histogram buckets) and any mismatch leaves the public API in charge.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from bisect import bisect_left
from typing import Any, Callable, Iterable, Iterator

from .spec import mp_metrics

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Anything else is counted as "other", so a client cannot grow the series count.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# Where one value lives: its file's mmap (the library's own mapping) as doubles, and the
# value's index there.
Slot = tuple[memoryview, int]
# One histogram child: the mapping, the index of its sum, the index of each bucket, and
# the upper bounds (the last one +Inf) that pick the bucket.
HistogramSlots = tuple[memoryview, int, tuple[int, ...], tuple[float, ...]]


def _library_lock(value: Any) -> Any | None:
    """The lock every write of prometheus_client's multiprocess value class takes (a
    closure variable of its `inc`), or None if `value` is not of that class as known."""
    cls = type(value)
    if not getattr(cls, "_multiprocess", False):
        return None
    try:
        cells = dict(zip(cls.inc.__code__.co_freevars, cls.inc.__closure__ or ()))
        lock = cells["lock"].cell_contents
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return lock if hasattr(lock, "__enter__") and hasattr(lock, "__exit__") else None


class _Recorder:
    """The bound label children of one app, filled lazily per (method, code), and on the
    fast path where each of their values lives in this process's files."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.bound = False
        self.lock: Any = None       # the fast path's lock, None: public API only
        # (method, code) -> (counter child, duration child, counter Slot, duration
        # HistogramSlots); the slots are None when bound off the fast path.
        self.series: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._durations: dict[str, tuple[Any, HistogramSlots | None]] = {}
        self._views: list[memoryview] = []
        # Binding runs once per child, before any fast-path write to it (_slot checks
        # the file against the library's copy of the value), even when gthread workers
        # answer a series' first requests in several threads at once.
        self._binding = threading.Lock()

    def bind(self) -> None:
        """Create the app's children (on a worker's first request) and, unless
        HOSTSVC_METRICS_FAST=0, locate their values for the fast path."""
        with self._binding:
            if not self.bound:
                self._bind()
                self.bound = True

    def _bind(self) -> None:
        m = mp_metrics()
        self._requests = m["hostsvc_http_requests_total"]
        self._duration = m["hostsvc_http_request_duration_seconds"]
        self.in_flight = m["hostsvc_http_requests_in_flight"].labels(self.app_name)
        self.queue = m["hostsvc_http_request_queue_seconds"].labels(self.app_name)
        self.size = m["hostsvc_http_response_size_bytes"].labels(self.app_name)
        lock = _library_lock(self.in_flight._value) \
            if os.environ.get("HOSTSVC_METRICS_FAST", "1") != "0" else None
        if lock is None:
            return
        try:
            with lock:
                self.in_flight_slot = self._slot(self.in_flight._value)
                self.queue_slots = self._histogram_slots(self.queue)
                self.size_slots = self._histogram_slots(self.size)
        except (AttributeError, KeyError, TypeError, ValueError):
            return
        os.register_at_fork(after_in_child=self._forked)
        self.lock = lock

    def _forked(self) -> None:
        """In a child forked after binding: the mappings are the parent's files, and the
        library, seeing a new pid, closes them (which our views would refuse) and opens
        the child's. The public API takes over there (and a binding lock another thread
        held at the fork would never be released: the child has its own)."""
        self.lock = None
        self._binding = threading.Lock()
        for view in self._views:
            view.release()

    def _slot(self, value: Any) -> Slot:
        """Where a MmapedValue keeps its value. Lock held. Raises if the layout is not
        the one MmapedDict documents (a value follows its key's length and key, padded
        to 8 bytes), so that bind() leaves the fast path off."""
        f = value._file
        pos = f._positions[value._key]
        for view in self._views:
            if view.obj is f._m:
                break
        else:
            # The library maps a file again when it grows it, and never closes the old
            # mapping: earlier views stay valid (entries never move), new ones use this.
            view = memoryview(f._m).cast("d")
            self._views.append(view)
        key = value._key.encode()
        at = pos - len(key) - (8 - (len(key) + 4) % 8)
        if pos % 8 or at < 12 or f._m[at:at + len(key)] != key or \
                int.from_bytes(f._m[at - 4:at], sys.byteorder) != len(key) or \
                view[pos // 8] != value._value:
            raise ValueError(f"unexpected layout of {f._fname}")
        return view, pos // 8

    def _histogram_slots(self, child: Any) -> HistogramSlots:
        """A histogram child's sum and buckets (one file, so one mapping). Lock held."""
        bounds = tuple(child._upper_bounds)
        if len(bounds) != len(child._buckets) or bounds[-1] != float("inf"):
            raise ValueError("unexpected histogram buckets")
        view, total = self._slot(child._sum)
        slots = [self._slot(b) for b in child._buckets]
        if any(bucket_view is not view for bucket_view, _ in slots):
            raise ValueError("histogram values on two mappings")
        return view, total, tuple(index for _, index in slots), bounds

    def _series(self, method: str, code: str) -> tuple[Any, Any, Any, Any]:
        """The children of a (method, code) seen for the first time, bound once."""
        with self._binding:
            return self.series.get((method, code)) or self._bind_series(method, code)

    def _bind_series(self, method: str, code: str) -> tuple[Any, Any, Any, Any]:
        counter = self._requests.labels(self.app_name, method, code, code[:1] + "xx")
        duration, duration_slots = self._durations.get(method, (None, None))
        if duration is None:
            duration = self._duration.labels(self.app_name, method)
        counter_slot = None
        lock = self.lock
        if lock is not None:
            with lock:
                counter_slot = self._slot(counter._value)
                if duration_slots is None:
                    duration_slots = self._histogram_slots(duration)
        self._durations[method] = duration, duration_slots
        series = self.series[(method, code)] = counter, duration, counter_slot, duration_slots
        return series

    def start(self, queued: float | None) -> None:
        """A request begins: in flight, and its queue time if nginx stamped it."""
        lock = self.lock
        if lock is None:
            self.in_flight.inc()
            if queued is not None:
                self.queue.observe(queued)
            return
        view, index = self.in_flight_slot
        with lock:
            view[index] += 1.0
            if queued is not None:
                view, total, buckets, bounds = self.queue_slots
                view[total] += queued
                view[buckets[bisect_left(bounds, queued)]] += 1.0

    def finish(self, method: str, status: str, started: float, size: int) -> None:
        """Record one finished request (status is the WSGI status line)."""
        elapsed = time.perf_counter() - started
        series = self.series.get((method, status[:3]))
        if series is None:
            series = self._series(method, status[:3])
        counter, duration, counter_slot, duration_slots = series
        lock = self.lock
        if lock is None:
            counter.inc()
            duration.observe(elapsed)
            self.size.observe(size)
            self.in_flight.dec()
            return
        # Each `view[i] += x` reads and writes one aligned 8-byte double in place: a
        # scrape reading the file concurrently sees the old or the new value, never a
        # partial one (struct.pack_into would zero the bytes before writing them).
        view, index = counter_slot
        with lock:
            view[index] += 1.0
            view, total, buckets, bounds = duration_slots
            view[total] += elapsed
            view[buckets[bisect_left(bounds, elapsed)]] += 1.0
            view, total, buckets, bounds = self.size_slots
            view[total] += size
            view[buckets[bisect_left(bounds, size)]] += 1.0
            view, index = self.in_flight_slot
            view[index] -= 1.0


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
        if not recorder.bound:
            recorder.bind()
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
