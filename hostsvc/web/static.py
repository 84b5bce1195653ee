"""Static files: `tools.staticdir`, `tools.staticfile`, and `serve_file` for handlers.

    config = {"/static": {"tools.staticdir.on": True,
                          "tools.staticdir.dir": "/srv/app/static",
                          "tools.staticdir.index": "index.html"},
              "/favicon.ico": {"tools.staticfile.on": True,
                               "tools.staticfile.filename": "/srv/app/favicon.ico"}}

Every file answer carries `ETag`, `Last-Modified` and `Accept-Ranges: bytes`, answers
conditional requests with 304 and single byte ranges with 206, and hands the open file to
the server as the body so `wsgi.file_wrapper` (sendfile under gunicorn) sends it without
copying it through Python. A request with several ranges gets the whole file (200), which
RFC 9110 allows and which spares us multipart/byteranges.

URL paths never reach outside the configured directory: `..` segments, backslashes and NUL
bytes are refused with 403 (whether they arrived literally or percent-encoded, since the
server decodes PATH_INFO before we see it), and the resolved real path of every file,
symlinks followed, must lie inside the real path of the directory or the file is treated
as missing. What remains is a race: a symlink swapped in between the check and the open
can still escape, so the served tree must not be writable by whoever sends requests.
"""
from __future__ import annotations

import mimetypes
import os
import re
import stat
import urllib.parse
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, BinaryIO

from .context import serving
from .errors import HTTPError, HTTPRedirect, NotFound
from .urls import url

_RANGE_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*", re.ASCII)


def staticdir(section: str, dir: str, root: str = "", match: str = "",
              content_types: dict[str, str] | None = None, index: str = "") -> bool:
    """Serve the file under `dir` named by the path below `section`; False when none.

    `section` is the config path that declared `tools.staticdir.dir` (the dispatcher sets
    it), so `/static/css/a.css` under section `/static` is `<dir>/css/a.css`. Returning
    False, as CherryPy does, lets the mounted handler answer (usually a 404), so a
    staticdir on "/" can sit beside ordinary handlers.
    """
    req = serving.request
    if req.method not in ("GET", "HEAD"):
        return False
    path_info = req.path_info
    if match and not re.search(match, path_info):
        return False
    if section == "/":
        branch = path_info
    elif path_info == section or path_info.startswith(section + "/"):
        branch = path_info[len(section):]
    else:
        return False
    branch = branch.lstrip("/")
    segments = branch.split("/")
    if "\\" in branch or "\x00" in branch or ".." in segments:
        raise HTTPError(403, "The path leaves the static directory.")
    if any(seg.startswith(".") for seg in segments):
        return False  # dotfiles (.git, .env, .htpasswd) are never published by accident
    base = os.path.realpath(_absolute(dir, root, "tools.staticdir.dir"))
    target = _contained(base, os.path.join(base, branch))
    if target is None:
        return False
    if os.path.isdir(target):
        if not index:
            return False
        target = _contained(base, os.path.join(target, index))
        if target is None or not os.path.isfile(target):
            return False
        if not path_info.endswith("/"):
            # Relative links in the index page only resolve against the slash form.
            raise HTTPRedirect(url(path_info + "/", req.query_string), 301)
    return _serve_tool_file(target, content_types)


def staticfile(filename: str, root: str = "", match: str = "",
               content_types: dict[str, str] | None = None) -> bool:
    """Serve one configured file (favicon.ico, robots.txt); False when it is missing."""
    req = serving.request
    if req.method not in ("GET", "HEAD"):
        return False
    if match and not re.search(match, req.path_info):
        return False
    return _serve_tool_file(_absolute(filename, root, "tools.staticfile.filename"),
                            content_types)


def serve_file(path: str, content_type: str | None = None, disposition: str | None = None,
               name: str | None = None) -> Any:
    """Set up the response to send the file at `path` and return its body.

    For handlers: `return web.lib.static.serve_file("/srv/files/report.pdf")`. Conditional
    and range requests are answered as for static directories. `disposition`
    ("attachment" or "inline") adds Content-Disposition naming `name` (default: the
    file's base name). A missing file or a directory is a 404. The path must be absolute
    so a handler cannot accidentally serve relative to whatever the working directory is.
    """
    if not os.path.isabs(path):
        raise ValueError(f"serve_file needs an absolute path, got {path!r}")
    opened = _open_regular(path)
    if opened is None:
        raise NotFound()
    fh, st = opened
    if content_type is None:
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if disposition is not None:
        serving.response.headers["Content-Disposition"] = _content_disposition(
            disposition, name if name is not None else os.path.basename(path))
    return _file_response(fh, st, content_type)


def serve_download(path: str, name: str | None = None) -> Any:
    """`serve_file` as an attachment, so browsers save the file instead of showing it."""
    return serve_file(path, "application/x-download", "attachment", name)


def _absolute(path: str, root: str, key: str) -> str:
    if not os.path.isabs(path):
        if not root:
            raise ValueError(f"{key} {path!r} is relative: make it absolute or set the "
                             f"tool's root to an absolute directory")
        path = os.path.join(root, path)
    if not os.path.isabs(path):
        raise ValueError(f"{key} {path!r} is not absolute even after joining root {root!r}")
    return path


def _contained(base: str, candidate: str) -> str | None:
    """The real path of `candidate` if it lies inside `base` (itself a real path)."""
    real = os.path.realpath(candidate)
    if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
        return real
    return None


def _serve_tool_file(path: str, content_types: dict[str, str] | None) -> bool:
    opened = _open_regular(path)
    if opened is None:
        return False
    fh, st = opened
    ctype = None
    if content_types:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        ctype = {k.lower().lstrip("."): v for k, v in content_types.items()}.get(ext)
    ctype = ctype or mimetypes.guess_type(path)[0] or "application/octet-stream"
    serving.response.body = _file_response(fh, st, ctype)
    return True


def _open_regular(path: str) -> tuple[BinaryIO, os.stat_result] | None:
    """Open `path` if it is a readable regular file; stat the open descriptor so the
    metadata we send describes the bytes we send even if the file is being replaced."""
    try:
        fh = open(path, "rb")
    except OSError:  # missing, a directory, no permission, a name too long, ...
        return None
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        fh.close()
        return None
    return fh, st


def _file_response(fh: BinaryIO, st: os.stat_result, content_type: str) -> Any:
    """Headers, status and body for an open file, honouring conditional and range headers."""
    req = serving.request
    resp = serving.response
    headers = resp.headers
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    headers["ETag"] = etag
    headers["Last-Modified"] = formatdate(st.st_mtime, usegmt=True)
    headers["Accept-Ranges"] = "bytes"
    if req.method in ("GET", "HEAD") and _not_modified(req.headers, etag, int(st.st_mtime)):
        fh.close()
        resp.status = 304
        return b""
    headers["Content-Type"] = content_type
    size = st.st_size
    range_header = req.headers.get("Range")
    if range_header and req.method in ("GET", "HEAD") and \
            _if_range_holds(req.headers.get("If-Range"), etag, int(st.st_mtime)):
        ranges = _parse_ranges(range_header, size)
        if ranges is not None and not ranges:
            fh.close()
            headers["Content-Range"] = f"bytes */{size}"
            raise HTTPError(416, "The requested range is not within the file.")
        if ranges is not None and len(ranges) == 1:
            start, end = ranges[0]
            resp.status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            headers["Content-Length"] = str(end - start)
            return _FileWindow(fh, start, end - start)
    headers["Content-Length"] = str(size)
    return fh


def _etag_list(value: str) -> list[str]:
    return [tag.strip().removeprefix("W/") for tag in value.split(",") if tag.strip()]


def _not_modified(headers: Any, etag: str, mtime: int) -> bool:
    """RFC 9110 13.2.2: If-None-Match (weak comparison) decides when present;
    If-Modified-Since only counts without it."""
    inm = headers.get("If-None-Match")
    if inm is not None:
        tags = _etag_list(inm)
        return "*" in tags or etag in tags
    since = _http_date(headers.get("If-Modified-Since"))
    return since is not None and mtime <= since


def _if_range_holds(value: str | None, etag: str, mtime: int) -> bool:
    """Whether a Range applies: If-Range needs a strong ETag match or the exact date."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    return _http_date(value) == mtime


def _http_date(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError):
        return None


def _parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """Satisfiable [start, end) byte ranges of a Range header.

    None means the header is malformed or not in bytes, and RFC 9110 says to ignore it
    (send the whole file); an empty list means every range lies outside the file (416).
    """
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    ranges = []
    parsed_any = False  # "bytes=" with no range at all is malformed: ignore it
    for part in spec.split(","):
        if not part.strip():
            continue
        m = _RANGE_SPEC.fullmatch(part)
        if m is None or not (m.group(1) or m.group(2)):
            return None
        first, last = m.groups()
        if not first:
            suffix = int(last)
            if suffix and size:
                ranges.append((max(0, size - suffix), size))
            parsed_any = True
            continue
        start = int(first)
        if last and int(last) < start:
            return None
        if start < size:
            ranges.append((start, min(int(last) + 1, size) if last else size))
        parsed_any = True
    return ranges if parsed_any else None


def _content_disposition(disposition: str, name: str) -> str:
    """`attachment; filename="..."` with an RFC 6266 filename* for non-ASCII names."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                       for c in name)
    value = f'{disposition}; filename="{fallback}"'
    if fallback != name:
        value += "; filename*=UTF-8''" + urllib.parse.quote(name, safe="")
    return value


class _FileWindow:
    """The bytes of one range of an open file.

    It has no fileno() on purpose: a file_wrapper that finds one may sendfile from the
    current offset to the end of the file, which would overrun the range.
    """

    def __init__(self, fh: BinaryIO, start: int, length: int) -> None:
        fh.seek(start)
        self._fh = fh
        self._left = length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        data = self._fh.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()
