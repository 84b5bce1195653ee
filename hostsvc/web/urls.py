"""Building absolute URLs that survive mounting under a prefix and a proxy in front."""
from __future__ import annotations

import posixpath
import urllib.parse
from typing import Any

from .context import serving


def url(path: str = "", qs: str | dict[str, Any] = "", script_name: str | None = None,
        base: str | None = None, relative: bool | str | None = None) -> str:
    """The absolute URL for `path` in the current app: `url("/notes/3")` ->
    `https://example.com/api/notes/3` when mounted at /api behind a proxy.

    A path without a leading "/" is relative to the current request's path; `qs` may
    be a string or a dict; `relative=True` gives a path relative to the current URL,
    `relative="server"` a path from the server root.
    """
    if isinstance(qs, dict):
        qs = urllib.parse.urlencode(qs, doseq=True)
    if qs:
        qs = "?" + qs
    req = serving.request
    if req is not None:
        if not path.startswith("/"):
            pi = req.path_info
            if req.is_index is True:
                if not pi.endswith("/"):
                    pi += "/"
            elif req.is_index is False and pi.endswith("/") and pi != "/":
                pi = pi[:-1]
            path = pi if path == "" else urllib.parse.urljoin(pi, path)
        if script_name is None:
            script_name = req.script_name
        if base is None:
            base = req.base
    else:
        script_name = script_name or ""
        base = base or ""
    new = _normalize(script_name + path) + qs
    if relative == "server":
        return new
    if relative:
        current = (req.script_name + req.path_info) if req is not None else "/"
        rel = posixpath.relpath(new.split("?", 1)[0], posixpath.dirname(current) or "/")
        return rel + (qs or "")
    return base + new


def _normalize(path: str) -> str:
    """Resolve "." and ".." segments, keeping a trailing slash."""
    if not path:
        return "/"
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if len(out) > 1:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/".join(out)
    if not result.startswith("/"):
        result = "/" + result
    return result
