"""Small HTTP tools: trailing_slash, allow, response_headers, expires, proxy, basic_auth."""
from __future__ import annotations

import base64
import binascii
import time
from email.utils import formatdate
from typing import Callable, Iterable

from .context import serving
from .errors import HTTPError, HTTPRedirect
from .request import Remote
from .urls import url


def trailing_slash(missing: bool = True, extra: bool = False, status: int | None = None
                   ) -> None:
    """Redirect `/node` to `/node/` when an index serves it (and, with `extra`, the reverse).

    On by default, as in CherryPy; redirects keep the query string and use 301.
    """
    req = serving.request
    pi = req.path_info
    if req.is_index is True:
        if missing and not pi.endswith("/"):
            raise HTTPRedirect(url(pi + "/", req.query_string), status or 301)
    elif req.is_index is False:
        if extra and pi.endswith("/") and pi != "/":
            raise HTTPRedirect(url(pi[:-1], req.query_string), status or 301)


def allow(methods: Iterable[str] | None = None) -> None:
    """405 with an `Allow` header unless the method is listed (default GET and HEAD)."""
    allowed = [m.upper() for m in (methods or ("GET", "HEAD"))]
    if "GET" in allowed and "HEAD" not in allowed:
        allowed.append("HEAD")
    serving.response.headers["Allow"] = ", ".join(allowed)
    if serving.request.method not in allowed:
        raise HTTPError(405)


def response_headers(headers: Iterable[tuple[str, str]] | dict[str, str] | None = None,
                     force: bool = True) -> None:
    """Set fixed response headers; with `force=False` only where not already set."""
    if not headers:
        return
    items = headers.items() if isinstance(headers, dict) else headers
    h = serving.response.headers
    for name, value in items:
        if force or name not in h:
            h[name] = value


def expires(secs: int | float = 0, force: bool = False) -> None:
    """Cache-Control/Expires for successful responses: `secs` seconds, 0 meaning no-cache.

    Responses that already set caching headers keep them unless `force`.
    """
    resp = serving.response
    h = resp.headers
    status = int(str(resp.status)[:3])
    if not force and ("Cache-Control" in h or "Expires" in h or status >= 400):
        return
    secs = int(secs)
    if secs <= 0:
        h["Cache-Control"] = "no-cache, must-revalidate"
        h["Pragma"] = "no-cache"
        h["Expires"] = "Thu, 01 Jan 1970 00:00:01 GMT"
    else:
        h["Cache-Control"] = f"max-age={secs}"
        h["Expires"] = formatdate(time.time() + secs, usegmt=True)


def proxy(base: str | None = None, local: str = "X-Forwarded-Host",
          remote: str = "X-Forwarded-For", scheme: str = "X-Forwarded-Proto") -> None:
    """Trust the proxy in front for the client's scheme, host and address.

    Only switch this on where a trusted proxy (hostsvc's nginx) is the only way in: it
    believes the forwarded headers. It runs on every request of every hostsvc app, so
    it reads its few headers one by one instead of building `request.headers`.
    """
    req = serving.request
    header = req.header
    proto = header(scheme) if scheme else None
    if proto:
        proto = proto.split(",", 1)[0].strip().lower()
    if proto not in ("http", "https"):
        proto = req.scheme
    if base is None:
        host = header(local) if local else None
        host = host.split(",", 1)[0].strip() if host else None
        host = host or header("Host") or req.base.split("://", 1)[1]
        base = f"{proto}://{host}"
    elif "://" not in base:
        base = f"{proto}://{base}"
    req.__dict__["base"] = base.rstrip("/")
    req.__dict__["scheme"] = proto
    if remote:
        forwarded = header(remote)
        if forwarded:
            # The rightmost entry is the one our own proxy appended; the rest are client claims.
            ip = forwarded.rsplit(",", 1)[-1].strip()
            if ip:
                req.__dict__["remote"] = Remote(ip, req.remote.port)


def basic_auth(realm: str, checkpassword: Callable[[str, str, str], bool] | dict[str, str],
               accept_charset: str = "utf-8") -> None:
    """HTTP Basic authentication: 401 with a challenge unless `checkpassword` accepts.

    `checkpassword(realm, user, password)` returns a bool; a dict {user: password} works
    too. The user name lands in `request.login`.
    """
    req = serving.request
    if isinstance(checkpassword, dict):
        users = checkpassword
        checkpassword = lambda _realm, user, pw: users.get(user) == pw  # noqa: E731
    auth = req.wsgi_environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, params = auth.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(params.strip(), validate=True).decode(accept_charset)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise HTTPError(400, "Bad Authorization header.") from None
        user, sep, password = decoded.partition(":")
        if sep and checkpassword(realm, user, password):
            req.login = user
            return
    serving.response.headers["WWW-Authenticate"] = \
        f'Basic realm="{realm}", charset="{accept_charset.upper()}"'
    raise HTTPError(401, "You are not authorized to access that resource")


