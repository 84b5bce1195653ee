"""A tiny WSGI app for tests/test_metrics.py, run under real gunicorn with instrument().

Paths: /code/<n> answers status n with a 10-byte body; /stream yields 3 chunks of 5
bytes; /sleep/<s>?pidfile=PATH writes the worker's pid to PATH, then sleeps s seconds.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs

from hostsvc.metrics import instrument

REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 201: "Created"}


def _stream() -> Iterator[bytes]:
    for _ in range(3):
        yield b"12345"


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    parts = environ["PATH_INFO"].strip("/").split("/")
    if parts[0] == "code":
        code = int(parts[1])
        start_response(f"{code} {REASONS.get(code, 'X')}", [("Content-Type", "text/plain")])
        return [b"0123456789"]
    if parts[0] == "stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream()
    if parts[0] == "sleep":
        pidfile = parse_qs(environ.get("QUERY_STRING", "")).get("pidfile")
        if pidfile:
            with open(pidfile[0], "w") as fh:
                fh.write(str(os.getpid()))
        time.sleep(float(parts[1]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slept"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no"]


app = instrument(os.environ["TEST_APP_NAME"], hello)
