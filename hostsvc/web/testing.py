"""Calling a WSGI app in-process, for tests: `Client(app).get("/notes?x=1")`.

No server and no sockets: the environ is built as gunicorn would build it, so tests of
the framework run in microseconds. Integration tests use the real stack instead.
"""
from __future__ import annotations

import io
import json as jsonlib
import urllib.parse
from typing import Any, Callable, Iterable

from .headers import HeaderMap


class TestResponse:
    """What the app answered: `status` ("404 Not Found"), `code`, `headers`, `body`."""

    __test__ = False  # not a pytest test class

    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.code = int(status[:3])
        self.header_list = headers
        self.headers = HeaderMap(headers)
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.header_list if k.lower() == name.lower()]

    def __repr__(self) -> str:
        return f"<TestResponse {self.status} {self.body[:60]!r}>"


class Client:
    """Drives a WSGI app directly; keeps cookies between requests like a browser."""

    __test__ = False

    def __init__(self, app: Callable[..., Iterable[bytes]], host: str = "testserver",
                 script_name: str = "") -> None:
        self.app = app
        self.host = host
        self.script_name = script_name
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, json: Any = None,
                form: dict[str, Any] | None = None, environ: dict[str, Any] | None = None
                ) -> TestResponse:
        path, _, qs = path.partition("?")
        headers = dict(headers or {})
        if json is not None:
            body = jsonlib.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        elif form is not None:
            body = urllib.parse.urlencode(form, doseq=True)
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        data = body.encode("utf-8") if isinstance(body, str) else (body or b"")
        env: dict[str, Any] = {
            "REQUEST_METHOD": method.upper(),
            "SCRIPT_NAME": self.script_name,
            "PATH_INFO": urllib.parse.unquote(path, encoding="latin-1"),
            "RAW_URI": path + ("?" + qs if qs else ""),
            "QUERY_STRING": qs,
            "SERVER_NAME": self.host,
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_PORT": "40000",
            "HTTP_HOST": self.host,
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(data),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.version": (1, 0),
        }
        if data or method.upper() in ("POST", "PUT", "PATCH"):
            env["CONTENT_LENGTH"] = str(len(data))
        if self.cookies and "Cookie" not in headers:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        for name, value in headers.items():
            key = name.upper().replace("-", "_")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                env[key] = value
            else:
                env["HTTP_" + key] = value
        if environ:
            env.update(environ)
        captured: dict[str, Any] = {}

        def start_response(status: str, hdrs: list[tuple[str, str]], exc_info: Any = None
                           ) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, hdrs
            return lambda _data: None

        result = self.app(env, start_response)
        try:
            out = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        resp = TestResponse(captured["status"], captured["headers"], out)
        self._store_cookies(resp)
        return resp

    def _store_cookies(self, resp: TestResponse) -> None:
        from http.cookies import SimpleCookie

        for header in resp.header_values("Set-Cookie"):
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                expired = morsel["max-age"] in ("0",) or "1970" in morsel["expires"]
                if expired or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    def get(self, path: str, **kw: Any) -> TestResponse:
        return self.request("GET", path, **kw)

    def head(self, path: str, **kw: Any) -> TestResponse:
        return self.request("HEAD", path, **kw)

    def post(self, path: str, **kw: Any) -> TestResponse:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> TestResponse:
        return self.request("PUT", path, **kw)

    def patch(self, path: str, **kw: Any) -> TestResponse:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> TestResponse:
        return self.request("DELETE", path, **kw)
