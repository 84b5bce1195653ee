"""Parsing query strings and request bodies into handler keyword arguments."""
from __future__ import annotations

import re
import urllib.parse
from typing import Any, BinaryIO

import multipart

from .errors import HTTPError


# A "%" not followed by two hex digits: urllib would pass it through silently.
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def add_param(params: dict[str, Any], key: str, value: Any) -> None:
    """Repeated keys become lists, as CherryPy passes them to handlers."""
    if key in params:
        existing = params[key]
        if isinstance(existing, list):
            existing.append(value)
        else:
            params[key] = [existing, value]
    else:
        params[key] = value


def parse_query(qs: str, encoding: str = "utf-8") -> dict[str, Any]:
    """`a=1&a=2&b=` -> {"a": ["1", "2"], "b": ""}; invalid UTF-8 is a 400."""
    params: dict[str, Any] = {}
    if not qs:
        return params
    unquote = urllib.parse.unquote
    try:
        for pair in qs.split("&"):
            if not pair:
                continue
            key, _, value = pair.partition("=")
            # Most query strings need no decoding at all; skip the work when so.
            if "+" in pair:
                key, value = key.replace("+", " "), value.replace("+", " ")
            if "%" in pair:
                if BAD_ESCAPE.search(pair):
                    raise HTTPError(400, "The query string has a malformed percent-escape.")
                key = unquote(key, encoding, "strict")
                value = unquote(value, encoding, "strict")
            add_param(params, key, value)
    except UnicodeDecodeError:
        raise HTTPError(400, "The query string is not valid percent-encoded UTF-8.") from None
    return params


class UploadedFile:
    """A file field of a multipart form: `filename`, `content_type`, `file`, `read()`."""

    def __init__(self, part: "multipart.MultipartPart") -> None:
        self._part = part
        self.name: str = part.name
        self.filename: str = part.filename or ""
        self.content_type: str = part.content_type or "application/octet-stream"
        self.size: int = part.size
        self.file: BinaryIO = part.file

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def fullvalue(self) -> bytes:
        """The whole content (CherryPy's Part.fullvalue, as bytes)."""
        self.file.seek(0)
        return self.file.read()

    def save_as(self, path: str) -> int:
        """Write the upload to `path`; returns the number of bytes written."""
        return self._part.save_as(path)

    def __repr__(self) -> str:
        return f"<UploadedFile {self.name}={self.filename!r} {self.content_type} {self.size}B>"


def parse_multipart(stream: BinaryIO, content_type: str, content_length: int,
                    max_size: int, encoding: str = "utf-8"
                    ) -> tuple[dict[str, Any], dict[str, UploadedFile]]:
    """Split a multipart/form-data body into (fields, files); malformed input is a 400."""
    _, options = multipart.parse_options_header(content_type)
    boundary = options.get("boundary")
    if not boundary:
        raise HTTPError(400, "multipart/form-data without a boundary.")
    fields: dict[str, Any] = {}
    files: dict[str, UploadedFile] = {}
    try:
        parser = multipart.MultipartParser(
            stream, boundary, content_length=content_length if content_length >= 0 else -1,
            partsize_limit=max_size, disk_limit=max_size,
            memory_limit=min(max_size, 8 * 1024 * 1024), charset=encoding)
        for part in parser:
            if part.filename is not None:
                upload = UploadedFile(part)
                add_param(files, part.name, upload)  # type: ignore[arg-type]
                add_param(fields, part.name, upload)
            else:
                add_param(fields, part.name, part.value)
    except multipart.ParserLimitReached:
        raise HTTPError(413, "The multipart body is larger than allowed.") from None
    except (multipart.MultipartError, UnicodeDecodeError, LookupError) as exc:
        raise HTTPError(400, f"Malformed multipart body: {exc}") from None
    return fields, files
