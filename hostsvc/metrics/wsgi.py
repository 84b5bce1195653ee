"""`instrument()`: the WSGI middleware that counts and times requests inside a worker.

Cost matters here (every request pays it), so label children are bound once per
(method, code) and cached; a list or tuple body (the common case) is measured at once
and returned untouched, and only other iterables get a wrapper that counts bytes as the
server pulls them, keeping streamed responses streamed.

The children are created on a worker's first request, never in the arbiter: with
preload_app the middleware is built in the arbiter, and a value touched there would
leave a per-arbiter file behind for nothing.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

from .spec import mp_metrics

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Anything else is counted as "other", so a client cannot grow the series count.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Recorder:
    """The bound label children of one app, filled lazily per (method, code)."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._ready = False
        self.requests: dict[tuple[str, str], Any] = {}
        self.durations: dict[str, Any] = {}

    def bind(self) -> None:
        m = mp_metrics()
        self._requests = m["hostsvc_http_requests_total"]
        self._duration = m["hostsvc_http_request_duration_seconds"]
        self.in_flight = m["hostsvc_http_requests_in_flight"].labels(self.app_name)
        self.queue = m["hostsvc_http_request_queue_seconds"].labels(self.app_name)
        self.size = m["hostsvc_http_response_size_bytes"].labels(self.app_name)
        self._ready = True

    def start(self) -> None:
        if not self._ready:
            self.bind()
        self.in_flight.inc()

    def finish(self, method: str, status: str, started: float, size: int) -> None:
        """Record one finished request (status is the WSGI status line)."""
        code = status[:3]
        counter = self.requests.get((method, code))
        if counter is None:
            counter = self.requests[(method, code)] = self._requests.labels(
                self.app_name, method, code, code[:1] + "xx")
        counter.inc()
        duration = self.durations.get(method)
        if duration is None:
            duration = self.durations[method] = self._duration.labels(self.app_name, method)
        duration.observe(time.perf_counter() - started)
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
        recorder.start()
        header = environ.get("HTTP_X_REQUEST_START")
        if header is not None and header.startswith("t="):
            try:
                recorder.queue.observe(max(0.0, time.time() - float(header[2:])))
            except ValueError:
                pass
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
