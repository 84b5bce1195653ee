"""Body encodings: `tools.encode` picks the charset, `tools.gzip` compresses."""
from __future__ import annotations

import zlib
from typing import Any, Iterable, Iterator

from .context import serving


def encode(encoding: str = "utf-8", text_only: bool = True, add_charset: bool = True) -> None:
    """Encode a str body (or str chunks) with `encoding` and name it in Content-Type."""
    resp = serving.response
    ctype = resp.headers.get("Content-Type", "")
    if text_only and not ctype.startswith("text/") and "json" not in ctype:
        return
    body = resp.body
    if isinstance(body, str):
        resp.body = body.encode(encoding)
    elif body is not None and not isinstance(body, (bytes, bytearray)) \
            and not hasattr(body, "read"):
        resp.body = _encode_iter(body, encoding)
    if add_charset and ctype:
        base = ctype.split(";", 1)[0]
        resp.headers["Content-Type"] = f"{base};charset={encoding}"


def _encode_iter(chunks: Iterable[object], encoding: str) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk.encode(encoding) if isinstance(chunk, str) else chunk  # type: ignore[misc]


def gzip(compress_level: int = 5, mime_types: Iterable[str] = ("text/html", "text/plain"),
         min_size: int = 0) -> None:
    """Gzip the body when the client accepts it and the media type is listed.

    Media types may end in `/*` (`text/*`). Streaming bodies are compressed as they are
    sent, without being collected first. Always adds `Vary: Accept-Encoding`.
    """
    req = serving.request
    resp = serving.response
    headers = resp.headers
    vary = headers.get("Vary")
    if not vary:
        headers["Vary"] = "Accept-Encoding"
    elif "accept-encoding" not in vary.lower():
        headers["Vary"] = vary + ", Accept-Encoding"
    if "Content-Encoding" in headers or int(str(resp.status)[:3]) in (204, 206, 304):
        return
    ctype = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if not any(ctype == m or (m.endswith("/*") and ctype.startswith(m[:-1]))
               for m in mime_types):
        return
    if not _accepts_gzip(req.headers.get("Accept-Encoding", "")):
        return
    body = resp.body
    if hasattr(body, "read"):
        # Files are compressed as they are sent, never read into memory first.
        resp.body = _gzip_stream(_read_chunks(body), compress_level)
    elif isinstance(body, (bytes, str)) or body is None or isinstance(body, (list, tuple)):
        data = resp.collapse_body()
        if len(data) < min_size:
            return
        comp = zlib.compressobj(compress_level, zlib.DEFLATED, 31)
        resp.body = comp.compress(data) + comp.flush()
    else:
        resp.body = _gzip_stream(body, compress_level)
    headers.pop("Content-Length", None)
    headers["Content-Encoding"] = "gzip"


def _read_chunks(fileobj: Any) -> Iterator[bytes]:
    try:
        while True:
            chunk = fileobj.read(65536)
            if not chunk:
                return
            yield chunk
    finally:
        fileobj.close()


def _accepts_gzip(accept: str) -> bool:
    for coding in accept.split(","):
        name, _, params = coding.partition(";")
        name = name.strip().lower()
        if name in ("gzip", "x-gzip", "*"):
            q = params.strip()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


def _gzip_stream(chunks: Iterable[object], level: int) -> Iterator[bytes]:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    for chunk in chunks:
        data = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        # Sync-flush each chunk so a streamed response reaches the client as it is made.
        yield comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)  # type: ignore[arg-type]
    yield comp.flush()
