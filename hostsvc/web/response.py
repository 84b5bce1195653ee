"""The response a handler shapes through `web.response`, and its conversion to WSGI."""
from __future__ import annotations

import os
import re
from .lazy import lazy_property
from http.cookies import SimpleCookie
from types import GeneratorType
from typing import Any, Iterable, Iterator

from .errors import status_line
from .headers import HeaderMap

DEFAULT_CONTENT_TYPE = "text/html;charset=utf-8"


_BAD_HEADER_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")


def _encode_chunks(chunks: Iterable[Any], encoding: str) -> Iterator[bytes]:
    for chunk in chunks:
        if isinstance(chunk, str):
            yield chunk.encode(encoding)
        elif isinstance(chunk, (bytes, bytearray, memoryview)):
            if chunk:
                yield bytes(chunk)
        else:
            # bytes(5) would be five NUL bytes: refuse anything that is not text or bytes.
            raise TypeError(f"a response body chunk must be str or bytes, not "
                            f"{type(chunk).__name__}")


def _check_header(name: str, value: Any) -> str:
    """Header values as WSGI wants them: str of latin-1 without CR, LF or other controls.

    A bad value is the application's bug; raising here turns it into the app's own 500
    page (and a logged reason) instead of the server's, and can never split a header.
    """
    value = value if isinstance(value, str) else str(value)
    if not (value.isascii() and value.isprintable()) and _BAD_HEADER_VALUE.search(value):
        raise ValueError(f"response header {name!r} has a character that cannot be sent: "
                         f"{value!r}")
    return value


class Response:
    """Status, headers, cookies and body of the response being built."""

    # Until a handler or tool sets them, the class provides these (no per-request store).
    status: int | str = 200
    body: Any = None
    stream = False

    def __init__(self) -> None:
        self.headers = HeaderMap()
        dict.__setitem__(self.headers, "Content-Type", DEFAULT_CONTENT_TYPE)

    @lazy_property
    def cookie(self) -> SimpleCookie:
        """Cookies to set: `response.cookie["sid"] = "x"; response.cookie["sid"]["path"] = "/"`."""
        return SimpleCookie()

    def collapse_body(self, encoding: str = "utf-8") -> bytes:
        """Read the whole body into bytes (for tools that must see all of it, like gzip)."""
        body = self.body
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode(encoding)
        elif hasattr(body, "read"):
            try:
                data = body.read()
            finally:
                getattr(body, "close", lambda: None)()
        else:
            data = b"".join(_encode_chunks(body, encoding))
        self.body = data
        return data

    def finalize(self, environ: dict[str, Any], encoding: str = "utf-8"
                 ) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
        """The WSGI status line, header list and body iterable for this response.

        A body known in full goes out as a one-item list, not a tuple: granian sends a
        list in one write, and any other iterable down its chunk-by-chunk path, which
        served a hello ~25% slower on bench/web.py's machine (gunicorn treats both alike).
        """
        status = self.status
        line = "200 OK" if status == 200 else status_line(status)[1]
        headers = self.headers
        body = self.body
        out: Iterable[bytes]
        # dict.__setitem__: "Content-Length" is already in HeaderMap's canonical case.
        if body is None:
            out = [b""]
            dict.__setitem__(headers, "Content-Length", "0")
        elif isinstance(body, bytes):
            out = [body]
            dict.__setitem__(headers, "Content-Length", str(len(body)))
        elif isinstance(body, str):
            data = body.encode(encoding)
            out = [data]
            dict.__setitem__(headers, "Content-Length", str(len(data)))
        elif hasattr(body, "read"):
            out = self._file_body(body, environ)
        elif isinstance(body, (list, tuple)):
            data = b"".join(_encode_chunks(body, encoding))
            out = [data]
            dict.__setitem__(headers, "Content-Length", str(len(data)))
        elif isinstance(body, GeneratorType):
            # Generators stream: no Content-Length, nothing buffered.
            out = _GeneratorBody(body, encoding)
        else:
            # Other iterables stream too; iter() now so a non-iterable is an error here.
            out = _encode_chunks(iter(body), encoding)
        # Plain printable ASCII, nearly every value, needs no closer look.
        header_list = [(k, v) if type(v) is str and v.isascii() and v.isprintable()
                       else (k, _check_header(k, v)) for k, v in headers.items()]
        if "cookie" in self.__dict__:
            for morsel in self.cookie.values():
                header_list.append(("Set-Cookie", morsel.OutputString()))
        if status != 200:
            code = line[:3]
            if code in ("204", "304") or code[0] == "1":
                header_list = [(k, v) for k, v in header_list if k != "Content-Length"]
                if code == "304":
                    header_list = [(k, v) for k, v in header_list if k != "Content-Type"]
                out = [b""]
        return line, header_list, out

    def _file_body(self, fileobj: Any, environ: dict[str, Any]) -> Iterable[bytes]:
        headers = self.headers
        if "Content-Length" not in headers:
            try:
                st = os.fstat(fileobj.fileno())
                headers["Content-Length"] = str(st.st_size - fileobj.tell())
            except (AttributeError, OSError, ValueError):
                pass
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(fileobj, 65536)
        return _FileIter(fileobj)


class _FileIter:
    def __init__(self, fileobj: Any) -> None:
        self.fileobj = fileobj

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self.fileobj.read(65536)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self.fileobj.close()


class _GeneratorBody:
    """Streams a handler's generator and closes it when the server is done with it."""

    def __init__(self, gen: GeneratorType, encoding: str) -> None:
        self.gen = gen
        self.encoding = encoding

    def __iter__(self) -> Iterator[bytes]:
        return _encode_chunks(self.gen, self.encoding)

    def close(self) -> None:
        self.gen.close()
