"""Tools: config vs decorator activation, hook order, custom tools, and each built-in."""
from __future__ import annotations

import base64
import gzip as gz

import pytest

from hostsvc import web
from hostsvc.web.testing import Client

calls: list[str] = []


def record(label: str) -> None:
    calls.append(label)


# A user-written tool: a few lines.
web.tools.test_record = web.Tool("before_handler", lambda label="x": record(label))
web.tools.test_record_early = web.Tool("on_start_resource", lambda: record("start"), priority=10)


class Sub:
    _cp_config = {"tools.test_record.label": "sub"}

    @web.expose
    def index(self):
        calls.append("handler")
        return "sub"

    @web.expose
    @web.tools.test_record(label="method")
    def decorated(self):
        calls.append("handler")
        return "decorated"


class Root:
    sub = Sub()

    @web.expose
    def index(self):
        return "root"

    @web.expose
    def big(self):
        web.response.headers["Content-Type"] = "text/plain"
        return "x" * 5000

    @web.expose
    def stream(self):
        web.response.headers["Content-Type"] = "text/plain"
        return (c for c in ["a" * 100, "b" * 100])

    @web.expose
    def image(self):
        web.response.headers["Content-Type"] = "image/png"
        return b"\x89PNG" * 100

    @web.expose
    def secret(self):
        return f"hello {web.request.login}"

    @web.expose
    def only_post(self):
        return "posted"

    @web.expose
    def where(self):
        return f"{web.request.base}|{web.request.remote.ip}|{web.url('/x')}"

    @web.expose
    def cached(self):
        return "c"

    @web.expose
    def latin(self):
        web.response.headers["Content-Type"] = "text/plain"
        return "é"


CONF = {
    "/sub": {"tools.test_record.on": True, "tools.test_record_early.on": True},
    "/big": {"tools.gzip.on": True, "tools.gzip.mime_types": ["text/*"]},
    "/stream": {"tools.gzip.on": True, "tools.gzip.mime_types": ["text/plain"]},
    "/image": {"tools.gzip.on": True},
    "/secret": {"tools.basic_auth.on": True, "tools.basic_auth.realm": "r",
                "tools.basic_auth.checkpassword": {"ann": "pw"}},
    "/only_post": {"tools.allow.on": True, "tools.allow.methods": ["POST"]},
    "/where": {"tools.proxy.on": True},
    "/cached": {"tools.expires.on": True, "tools.expires.secs": 60,
                "tools.response_headers.on": True,
                "tools.response_headers.headers": [("X-Frame-Options", "DENY")]},
    "/latin": {"tools.encode.on": True, "tools.encode.encoding": "latin-1"},
}
client = Client(web.Application(Root(), config=CONF))


def test_config_enabled_tool_runs_in_priority_order_with_class_args():
    calls.clear()
    assert client.get("/sub/").text == "sub"
    assert calls == ["start", "sub", "handler"]


def test_decorator_args_override_class_config():
    calls.clear()
    assert client.get("/sub/decorated").text == "decorated"
    assert calls == ["start", "method", "handler"]


def test_tools_are_off_where_not_configured():
    calls.clear()
    assert client.get("/").text == "root"
    assert calls == []


def test_unknown_tool_in_config_is_an_error():
    c = Client(web.Application(Root(), config={"/": {"tools.nope.on": True}}))
    assert c.get("/").code == 500


def test_gzip_compresses_when_accepted_and_adds_vary():
    r = client.get("/big", headers={"Accept-Encoding": "gzip, deflate"})
    assert r.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in r.headers["Vary"]
    assert gz.decompress(r.body) == b"x" * 5000
    assert int(r.headers["Content-Length"]) == len(r.body) < 5000


def test_gzip_skips_when_not_accepted_or_wrong_type():
    r = client.get("/big")
    assert "Content-Encoding" not in r.headers and r.body == b"x" * 5000
    r = client.get("/big", headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in r.headers
    r = client.get("/image", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in r.headers


def test_gzip_streams_generators():
    r = client.get("/stream", headers={"Accept-Encoding": "gzip"})
    assert r.headers["Content-Encoding"] == "gzip"
    assert gz.decompress(r.body) == b"a" * 100 + b"b" * 100


def test_basic_auth():
    r = client.get("/secret")
    assert r.code == 401 and r.headers["WWW-Authenticate"].startswith('Basic realm="r"')
    good = base64.b64encode(b"ann:pw").decode()
    assert client.get("/secret", headers={"Authorization": "Basic " + good}).text == "hello ann"
    bad = base64.b64encode(b"ann:no").decode()
    assert client.get("/secret", headers={"Authorization": "Basic " + bad}).code == 401
    assert client.get("/secret", headers={"Authorization": "Basic !!!"}).code == 400


def test_allow():
    r = client.get("/only_post")
    assert r.code == 405 and r.headers["Allow"] == "POST"
    assert client.post("/only_post").text == "posted"


def test_proxy_trusts_forwarded_headers():
    r = client.get("/where", headers={"X-Forwarded-Host": "example.com",
                                      "X-Forwarded-Proto": "https",
                                      "X-Forwarded-For": "6.6.6.6, 10.0.0.7"})
    assert r.text == "https://example.com|10.0.0.7|https://example.com/x"


def test_expires_and_response_headers():
    r = client.get("/cached")
    assert r.headers["Cache-Control"] == "max-age=60"
    assert "Expires" in r.headers
    assert r.headers["X-Frame-Options"] == "DENY"


def test_encode_picks_charset():
    r = client.get("/latin")
    assert r.body == "é".encode("latin-1")
    assert r.headers["Content-Type"] == "text/plain;charset=latin-1"


@pytest.mark.parametrize("path,location", [
    ("/sub", "http://testserver/sub/"),
    ("/sub?a=1", "http://testserver/sub/?a=1"),
])
def test_trailing_slash_added_keeping_query(path, location):
    r = client.get(path)
    assert r.code == 301 and r.headers["Location"] == location


def test_trailing_slash_extra_is_configurable():
    assert client.get("/sub/decorated/").code == 200  # CherryPy default: extra=False
    c = Client(web.Application(Root(), config={"/": {"tools.trailing_slash.extra": True}}))
    r = c.get("/sub/decorated/?q=1")
    assert r.code == 301 and r.headers["Location"] == "http://testserver/sub/decorated?q=1"
    c = Client(web.Application(Root(), config={"/": {"tools.trailing_slash.on": False}}))
    assert c.get("/sub").code == 200


def test_per_request_hook_attach():
    class R:
        @web.expose
        def index(self, late=None):
            if late:
                web.request.hooks.attach("before_finalize", lambda: web.response.headers.update(
                    {"X-Late": "1"}))
            return "ok"
    c = Client(web.Application(R()))
    assert c.get("/?late=1").headers["X-Late"] == "1"
    # The attach did not leak into the cached hook map shared by later requests.
    assert "X-Late" not in c.get("/").headers


def test_on_end_request_runs_after_body_is_sent():
    seen = []

    def done():
        seen.append(web.response.status)
    web.tools.test_done = web.Tool("on_end_request", done)
    c = Client(web.Application(Root(), config={"/": {"tools.test_done.on": True}}))
    c.get("/")
    assert seen == [200]


def test_hooks_around_expected_and_unexpected_errors():
    """As in CherryPy: HTTPError/HTTPRedirect still run before_finalize (so sessions save
    on `raise HTTPRedirect`); unexpected exceptions run the error hooks instead."""
    web.tools.test_mark = web.Tool("before_finalize",
                                   lambda: web.response.headers.update({"X-Finalized": "1"}))
    web.tools.test_err = web.Tool("before_error_response",
                                  lambda: web.response.headers.update({"X-Error-Hook": "1"}))

    class R:
        @web.expose
        def denied(self):
            raise web.HTTPError(403)

        @web.expose
        def away(self):
            raise web.HTTPRedirect("/")

        @web.expose
        def broken(self):
            raise KeyError("x")
    c = Client(web.Application(R(), config={"/": {"tools.test_mark.on": True,
                                                  "tools.test_err.on": True}}))
    r = c.get("/denied")
    assert r.code == 403 and r.headers.get("X-Finalized") == "1" and "X-Error-Hook" not in r.headers
    r = c.get("/away")
    assert r.code == 303 and r.headers.get("X-Finalized") == "1"
    r = c.get("/broken")
    assert r.code == 500 and r.headers.get("X-Error-Hook") == "1" and "X-Finalized" not in r.headers
