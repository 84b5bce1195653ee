"""JSON in and out: `tools.json_in` parses the body, `tools.json_out` encodes the result."""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from .context import serving
from .errors import HTTPError

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def json_processor() -> None:
    """Parse the body into `request.json` (malformed JSON is a 400)."""
    req = serving.request
    req.json  # noqa: B018 - parses and caches, raising 400 on bad input


def json_in(content_type: str | Iterable[str] = ("application/json", "text/javascript"),
            force: bool = True, processor: Callable[[], None] = json_processor) -> None:
    """Require (with `force`) and parse a JSON request body into `request.json`.

    A body of another media type is a 415; a malformed one a 400. Requests without a
    body (GET, DELETE, an empty POST) pass through untouched, as in CherryPy.
    """
    req = serving.request
    if not req.process_request_body or isinstance(req.handler, HTTPError):
        return  # no body expected, or dispatch already failed (405/404 is the answer)
    env = req.wsgi_environ
    if env.get("CONTENT_LENGTH", "0") in ("0", "") and \
            env.get("HTTP_TRANSFER_ENCODING", "").lower() != "chunked":
        return  # an empty body is not "another media type"
    accepted = (content_type,) if isinstance(content_type, str) else tuple(content_type)
    if req.content_type in accepted:
        req.process_request_body = False
        processor()
    elif force:
        raise HTTPError(415, "Expected an entity of content type " + ", ".join(accepted))


def json_handler(*args: Any, **kwargs: Any) -> bytes:
    """Call the inner handler and encode its return value."""
    value = serving.request._json_inner_handler(*args, **kwargs)
    return _encoder.encode(value).encode("utf-8")


def json_out(content_type: str | None = "application/json",
             handler: Callable[..., Any] = json_handler) -> None:
    """Encode whatever the handler returns as JSON, and label the response so."""
    req = serving.request
    if req.handler is None or isinstance(req.handler, HTTPError):
        return
    req._json_inner_handler = req.handler
    req.handler = _Wrapped(handler, req.handler)
    if content_type is not None:
        serving.response.headers["Content-Type"] = content_type


class _Wrapped:
    """The outer handler, remembering the inner one so argument mismatches are judged
    against the signature the user wrote (404/400), not the wrapper's."""

    __slots__ = ("outer", "__wrapped__")

    def __init__(self, outer: Callable[..., Any], inner: Callable[..., Any]) -> None:
        self.outer = outer
        self.__wrapped__ = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.outer(*args, **kwargs)
