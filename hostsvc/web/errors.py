"""HTTP errors and redirects that handlers raise, and the error page they turn into.

A handler stops a request by raising: `HTTPError(404)`, `NotFound()`,
`HTTPRedirect("/elsewhere")`. The application catches these and asks the exception to
fill in the response, so a tool (auth, allow, ...) and a handler report errors the same way.
"""
from __future__ import annotations

import html
import logging
import os
import urllib.parse
from http import HTTPStatus
from typing import Iterable

from .context import serving

log = logging.getLogger("hostsvc.web")

_ERROR_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%(status)s</title></head>
<body><h1>%(status)s</h1><p>%(message)s</p>%(traceback_block)s</body></html>
"""


def status_line(status: int | str) -> tuple[int, str]:
    """Normalise `404` / `"404"` / `"404 Gone Fishing"` to (code, "404 Reason")."""
    if isinstance(status, int):
        code, reason = status, None
    else:
        text = str(status).strip()
        head, _, reason = text.partition(" ")
        try:
            code = int(head)
        except ValueError:
            raise ValueError(f"illegal HTTP status {status!r}") from None
        reason = reason.strip() or None
    if not 100 <= code <= 599:
        raise ValueError(f"illegal HTTP status code {code}")
    if reason is None:
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = ""
    return code, f"{code} {reason}".rstrip()


def _description(code: int) -> str:
    try:
        return HTTPStatus(code).description
    except ValueError:
        return ""


def render_error_page(status: str, message: str, traceback: str | None = None) -> bytes:
    """The body of an error response, from `error_page.<code>` / `error_page.default` if set.

    A configured page is a file (a template using %(status)s, %(message)s,
    %(traceback)s, %(version)s) or a callable taking those as keywords.
    """
    from .. import __version__

    code = status.split(" ", 1)[0]
    req = serving.request
    conf = req.config if req is not None else {}
    page = conf.get("error_page." + code) or conf.get("error_page.default")
    fields = {
        "status": html.escape(status),
        "message": html.escape(message),
        "traceback": html.escape(traceback or ""),
        "version": __version__,
    }
    if page is not None:
        try:
            if callable(page):
                # Escaped, as CherryPy passes them: messages often echo the request path.
                result = page(**fields)
            else:
                with open(os.fspath(page), encoding="utf-8") as fh:
                    result = fh.read() % fields
            return result.encode("utf-8") if isinstance(result, str) else bytes(result)
        except Exception:  # a broken error page must not hide the original error
            log.exception("error_page for %s failed; using the default page", code)
    block = f"<pre>{fields['traceback']}</pre>" if traceback else ""
    return (_ERROR_TEMPLATE % dict(fields, traceback_block=block)).encode("utf-8")


class HTTPError(Exception):
    """Ends the request with an error status and page: `raise HTTPError(403, "Go away")`."""

    def __init__(self, status: int | str = 500, message: str | None = None) -> None:
        self.code, self.status = status_line(status)
        if not 400 <= self.code <= 599:
            raise ValueError(f"HTTPError status must be 4xx or 5xx, not {self.code}")
        self._message = message
        super().__init__(self.status, message)

    @property
    def message(self) -> str:
        return self._message if self._message is not None else _description(self.code)

    def set_response(self, traceback: str | None = None) -> None:
        """Turn the current response into this error's page, keeping headers tools set."""
        resp = serving.response
        resp.status = self.status
        headers = resp.headers
        headers.pop("Content-Length", None)
        headers.pop("Content-Encoding", None)
        headers["Content-Type"] = "text/html;charset=utf-8"
        resp.body = render_error_page(self.status, self.message, traceback)


class NotFound(HTTPError):
    """404 naming the path that was not found, as CherryPy's NotFound does."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            req = serving.request
            path = (req.script_name + req.path_info) if req is not None else ""
        super().__init__(404, f"The path {path!r} was not found.")


class HTTPRedirect(Exception):
    """Redirects the client: `raise HTTPRedirect("/login")` (303 by default, as CherryPy)."""

    def __init__(self, urls: str | Iterable[str], status: int | None = None,
                 encoding: str | None = None) -> None:
        from .urls import url as abs_url

        if isinstance(urls, (str, bytes)):
            urls = [urls]
        base = abs_url() if serving.request is not None else ""
        # Percent-encode what may not appear raw in a Location header (non-ASCII, spaces,
        # control characters), leaving existing escapes and URL syntax alone.
        self.urls = [urllib.parse.quote(
            urllib.parse.urljoin(base, u.decode() if isinstance(u, bytes) else u),
            safe="!#$%&'()*+,/:;=?@[]~") for u in urls]
        if status is None:
            req = serving.request
            status = 303 if req is None or req.protocol >= (1, 1) else 302
        status = int(status)
        if not 300 <= status <= 399:
            raise ValueError(f"HTTPRedirect status must be 3xx, not {status}")
        self.status = self.code = status
        self.encoding = encoding or "utf-8"
        super().__init__(self.urls, status)

    def set_response(self) -> None:
        resp = serving.response
        resp.status = status_line(self.status)[1]
        headers = resp.headers
        headers.pop("Content-Length", None)
        if self.status == 304:
            for name in ("Content-Type", "Content-Encoding", "Content-Language",
                         "Content-Range", "Content-Location", "Content-MD5", "Expires",
                         "Last-Modified"):
                headers.pop(name, None)
            resp.body = b""
            return
        headers["Location"] = self.urls[0]
        headers["Content-Type"] = "text/html;charset=utf-8"
        if self.status in (300,):
            items = "".join(f'<li><a href="{html.escape(u)}">{html.escape(u)}</a></li>'
                            for u in self.urls)
            resp.body = f"<ul>{items}</ul>".encode()
        elif self.status == 305:
            resp.body = b""
        else:
            u = html.escape(self.urls[0])
            resp.body = f'This resource can be found at <a href="{u}">{u}</a>.'.encode()

