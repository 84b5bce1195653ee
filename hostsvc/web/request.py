"""The request object a handler sees as `web.request`.

Only what every request needs is computed up front (method, paths, query string); headers,
cookies, the query dict, the body and the client address are parsed on first use, so a
handler that never looks at them never pays for them.
"""
from __future__ import annotations

import json
from .lazy import lazy_property
from http.cookies import CookieError, SimpleCookie
from typing import Any, BinaryIO

from .errors import HTTPError
from .forms import BAD_ESCAPE, UploadedFile, parse_multipart, parse_query
from .headers import HeaderMap

METHODS_WITH_BODIES = frozenset(("POST", "PUT", "PATCH"))
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
JSON_TYPES = ("application/json", "text/javascript")
DEFAULT_MAX_BODY_SIZE = 100 * 1024 * 1024
# Headers whose environ keys have no HTTP_ prefix; `Request.header` leaves them to `headers`.
_UNPREFIXED = frozenset(("CONTENT_TYPE", "CONTENT_LENGTH"))

# Environ key -> header name ("HTTP_X_REAL_IP" -> "X-Real-Ip"), "" for other keys, and
# header name -> environ key for `Request.header`, "" where it defers to `headers`. A
# worker meets the same few dozen of each on every request (bare granian's also holds
# the whole os.environ), so each is worked out once. Clients choose header names: bounded.
_HEADER_NAMES: dict[str, str] = {}
_ENVIRON_KEYS: dict[str, str] = {}
_NAME_CACHE_LIMIT = 4096


def _remember(cache: dict[str, str], key: str, value: str) -> str:
    if len(cache) >= _NAME_CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _header_name(key: str) -> str:
    """The header name for environ `key` ("" if it is not a header), remembered."""
    return _remember(_HEADER_NAMES, key,
                     key[5:].replace("_", "-").title() if key.startswith("HTTP_") else "")


def _environ_key(name: str) -> str:
    """The environ key `Request.header` reads for `name` ("" to use `headers`), remembered.

    A name with "_" or outside ASCII, or Content-Type/-Length (no HTTP_ prefix in the
    environ), is one where `headers` might find what the plain key would not.
    """
    key = name.upper().replace("-", "_")
    plain = "_" not in name and name.isascii() and key not in _UNPREFIXED
    return _remember(_ENVIRON_KEYS, name, "HTTP_" + key if plain else "")


def wsgi_to_str(value: str) -> str | None:
    """WSGI carries paths as latin-1 decoded bytes; hostsvc's URLs are UTF-8.

    None when the bytes are not UTF-8: the application answers 400 for that.
    """
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


def _decode_paths(script_name: str, path_info: str) -> tuple[str, str, bool]:
    """SCRIPT_NAME and PATH_INFO as text, and whether both were UTF-8 (if not, the
    application answers 400, and "" and "/" stand in for what did not decode)."""
    script, path = wsgi_to_str(script_name), wsgi_to_str(path_info)
    return (script if script is not None else "", path if path is not None else "/",
            script is not None and path is not None)


class Remote:
    """The peer: `ip`, `port`, `name` (CherryPy's request.remote)."""

    __slots__ = ("ip", "port", "name")

    def __init__(self, ip: str, port: int, name: str = "") -> None:
        self.ip, self.port, self.name = ip, port, name or ip

    def __repr__(self) -> str:
        return f"Remote({self.ip!r}, {self.port})"


class RequestBody:
    """The request body as a stream, bounded by Content-Length and `request.max_body_size`.

    Reading past the configured maximum raises a 413, whether or not the client sent
    a Content-Length (chunked uploads are checked as they are read). Only the server's
    read() is used: granian 2.8's readline() drops the newline and then reports the end
    of the body, so lines are cut here, from blocks of up to 8 KiB.
    """

    def __init__(self, stream: BinaryIO, length: int | None, max_size: int) -> None:
        if length is not None and max_size and length > max_size:
            raise HTTPError(413, f"The request body is larger than {max_size} bytes.")
        self.fp = stream
        self.length = length
        self.max_size = max_size
        self._read = 0  # bytes taken from the stream: what the limits and draining count
        self._pending = b""  # taken from the stream by readline() but not handed out yet
        self.params: dict[str, Any] = {}

    def _budget(self, size: int) -> int:
        if self.length is not None:
            left = self.length - self._read
            return left if size < 0 else min(size, left)
        return size

    def _account(self, data: bytes) -> bytes:
        self._read += len(data)
        if self.max_size and self._read > self.max_size:
            raise HTTPError(413, f"The request body is larger than {self.max_size} bytes.")
        return data

    def _pull(self, size: int) -> bytes:
        """Up to `size` more bytes from the stream (-1: all that is left), within limits."""
        size = self._budget(size)
        if size == 0:
            return b""
        if size < 0:
            chunks = []
            while True:
                chunk = self._account(self.fp.read(65536))
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self._account(self.fp.read(size))

    def read(self, size: int = -1) -> bytes:
        pending = self._pending
        if not pending:
            return self._pull(size)
        if 0 <= size <= len(pending):
            self._pending = pending[size:]
            return pending[:size]
        self._pending = b""
        return pending + self._pull(size - len(pending) if size > 0 else -1)

    def readline(self, size: int = -1) -> bytes:
        """The next line, newline included, or at most `size` bytes of it."""
        line = bytearray()
        while size < 0 or len(line) < size:
            if not self._pending:
                self._pending = self._pull(8192)
                if not self._pending:
                    break
            pending = self._pending
            limit = len(pending) if size < 0 else min(len(pending), size - len(line))
            end = pending.find(b"\n", 0, limit)
            take = end + 1 if end >= 0 else limit
            line += pending[:take]
            self._pending = pending[take:]
            if end >= 0:
                break
        return bytes(line)

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class Request:
    """One HTTP request, as the framework and handlers see it."""

    # Set by dispatch, tools or handlers when they have something to say; until then the
    # class provides the value, so a request that never sets one pays nothing for it.
    handler: Any = None
    is_index: bool | None = None
    login: str | None = None
    session: Any = None

    def __init__(self, environ: dict[str, Any], app: Any = None) -> None:
        self.wsgi_environ = environ
        self.app = app
        self.method: str = environ["REQUEST_METHOD"]
        script_name = environ.get("SCRIPT_NAME", "")
        path_info = environ.get("PATH_INFO", "") or "/"
        valid = True
        if not (script_name.isascii() and path_info.isascii()):  # rare: something to decode
            script_name, path_info, valid = _decode_paths(script_name, path_info)
        raw = environ.get("RAW_URI")
        self.valid_path = valid and not (
            raw and "%" in raw and BAD_ESCAPE.search(raw.split("?", 1)[0]))
        self.script_name: str = script_name
        self.path_info: str = path_info
        self.query_string: str = environ.get("QUERY_STRING", "")
        self.config: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        self.process_request_body: bool = self.method in METHODS_WITH_BODIES

    @lazy_property
    def form(self) -> dict[str, Any]:
        """Form body fields; `process_body` replaces this with what it parsed."""
        return {}

    @lazy_property
    def files(self) -> dict[str, UploadedFile]:
        """Uploaded files of a multipart body; `process_body` replaces this."""
        return {}

    @lazy_property
    def headers(self) -> HeaderMap:
        env = self.wsgi_environ
        h = HeaderMap()
        known = _HEADER_NAMES.get
        for key, value in env.items():
            name = known(key)
            if name is None:
                name = _header_name(key)
            if name:
                dict.__setitem__(h, name, value)
        if "CONTENT_TYPE" in env and env["CONTENT_TYPE"]:
            dict.__setitem__(h, "Content-Type", env["CONTENT_TYPE"])
        if "CONTENT_LENGTH" in env and env["CONTENT_LENGTH"]:
            dict.__setitem__(h, "Content-Length", env["CONTENT_LENGTH"])
        return h

    def header(self, name: str) -> str | None:
        """`headers.get(name)`, without building `headers` when it does not exist yet.

        For tools that read a header or two on every request (tools.proxy): `headers`
        costs a step per environ key, and bare granian's environ holds the server's whole
        os.environ. Once `headers` exists (a tool may have changed it), it answers.
        """
        key = _ENVIRON_KEYS.get(name)
        if key is None:
            key = _environ_key(name)
        if not key or "headers" in self.__dict__:
            return self.headers.get(name)
        return self.wsgi_environ.get(key)

    @lazy_property
    def query(self) -> dict[str, Any]:
        """Query string parameters; repeated keys as lists."""
        return parse_query(self.query_string)

    @lazy_property
    def cookie(self) -> SimpleCookie:
        """Request cookies as CherryPy exposes them: `request.cookie["sid"].value`."""
        jar: SimpleCookie = SimpleCookie()
        raw = self.wsgi_environ.get("HTTP_COOKIE")
        if raw:
            # SimpleCookie drops the whole header at the first malformed pair; load pair
            # by pair so one bad cookie from another app on the domain hides nothing else.
            for piece in raw.split(";"):
                try:
                    jar.load(piece)
                except CookieError:
                    pass
        return jar

    @lazy_property
    def cookies(self) -> dict[str, str]:
        """Request cookies as a plain {name: value} dict."""
        return {k: m.value for k, m in self.cookie.items()}

    @lazy_property
    def scheme(self) -> str:
        return self.wsgi_environ.get("wsgi.url_scheme", "http")

    @lazy_property
    def protocol(self) -> tuple[int, int]:
        proto = self.wsgi_environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        try:
            major, minor = proto.split("/", 1)[1].split(".", 1)
            return int(major), int(minor)
        except (IndexError, ValueError):
            return (1, 1)

    @lazy_property
    def base(self) -> str:
        """scheme://host[:port] the client used (tools.proxy may rewrite it)."""
        env = self.wsgi_environ
        host = env.get("HTTP_HOST")
        if not host:
            host = env.get("SERVER_NAME", "localhost")
            port = env.get("SERVER_PORT", "")
            if port and port != ("443" if self.scheme == "https" else "80"):
                host = f"{host}:{port}"
        return f"{self.scheme}://{host}"

    @lazy_property
    def remote(self) -> Remote:
        env = self.wsgi_environ
        try:
            port = int(env.get("REMOTE_PORT") or 0)
        except ValueError:
            port = 0
        return Remote(env.get("REMOTE_ADDR") or "", port, env.get("REMOTE_HOST", ""))

    @property
    def max_body_size(self) -> int:
        return int(self.config.get("request.max_body_size", DEFAULT_MAX_BODY_SIZE) or 0)

    @property
    def content_type(self) -> str:
        """The media type of the body, lower-cased, without parameters."""
        return self.wsgi_environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()

    @lazy_property
    def body(self) -> RequestBody:
        env = self.wsgi_environ
        raw_len = env.get("CONTENT_LENGTH")
        length: int | None
        if raw_len:
            try:
                length = int(raw_len)
            except ValueError:
                raise HTTPError(400, "Malformed Content-Length header.") from None
            if length < 0:
                raise HTTPError(400, "Malformed Content-Length header.")
        elif env.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            length = None
        else:
            length = 0
        return RequestBody(env["wsgi.input"], length, self.max_body_size)

    @lazy_property
    def json(self) -> Any:
        """The body decoded as JSON (400 when it is not valid JSON)."""
        raw = self.body.read()
        if not raw:
            raise HTTPError(400, "Expected a JSON body, got an empty one.")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"Invalid JSON document: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "Invalid JSON document: nested too deeply.") from None

    # -- body processing --------------------------------------------------------------
    def process_body(self) -> None:
        """Parse a form body (urlencoded or multipart) into `form`, `files` and `params`.

        Other media types are left unread on `request.body` for the handler or a tool.
        """
        ctype = self.content_type
        if ctype == "application/x-www-form-urlencoded":
            raw = self.body.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise HTTPError(400, "The form body is not valid UTF-8.") from None
            self.form = parse_query(text)
        elif ctype == "multipart/form-data":
            body = self.body
            length = body.length if body.length is not None else -1
            self.form, self.files = parse_multipart(
                body, self.wsgi_environ.get("CONTENT_TYPE", ""), length, body.max_size
                or DEFAULT_MAX_BODY_SIZE)
        else:
            return
        self.body.params = self.form

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.script_name}{self.path_info}>"
