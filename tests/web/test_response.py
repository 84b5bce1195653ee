"""Response bodies (str, bytes, generators, files, JSON), HEAD, errors and error pages."""
from __future__ import annotations

import logging

import pytest

from hostsvc import web
from hostsvc.web.testing import Client


class Root:
    @web.expose
    def text(self):
        return "héllo"

    @web.expose
    def data(self):
        web.response.headers["Content-Type"] = "application/octet-stream"
        return b"\x00\x01"

    @web.expose
    def gen(self):
        events.append("handler")

        def stream():
            for i in range(3):
                events.append(f"chunk{i}")
                yield f"{i},"
        return stream()

    @web.expose
    def listbody(self):
        return ["a", b"b", "c"]

    @web.expose
    def file(self):
        return open(__file__, "rb")

    @web.expose
    def status(self):
        web.response.status = "201 Created"
        web.response.headers["Location"] = web.url("/text")
        return ""

    @web.expose
    def nocontent(self):
        web.response.status = 204

    @web.expose
    def crash(self):
        raise RuntimeError("secret detail")

    @web.expose
    def teapot(self):
        raise web.HTTPError(418, "<short & stout>")

    @web.expose
    def cookie(self):
        web.response.cookie["a"] = "1"
        web.response.cookie["a"]["path"] = "/"
        web.response.cookie["b"] = "2"
        return "ok"

    @web.expose
    def typeerror_inside(self, a=None):
        return len(5)  # a TypeError raised by the handler's own code


events: list[str] = []
client = Client(web.Application(Root()))


def test_str_is_utf8_with_length():
    r = client.get("/text")
    assert r.body == "héllo".encode()
    assert r.headers["Content-Length"] == str(len("héllo".encode()))
    assert r.headers["Content-Type"] == "text/html;charset=utf-8"


def test_bytes_and_lists():
    assert client.get("/data").body == b"\x00\x01"
    r = client.get("/listbody")
    assert r.body == b"abc" and r.headers["Content-Length"] == "3"


def test_generator_is_streamed_not_buffered():
    events.clear()
    app = web.Application(Root())
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/gen", "QUERY_STRING": "",
           "wsgi.input": None, "SERVER_NAME": "x", "SERVER_PORT": "80"}
    body = app(env, lambda s, h: None)
    assert events == ["handler"]          # nothing produced before the server iterates
    it = iter(body)
    assert next(it) == b"0,"
    assert events == ["handler", "chunk0"]
    assert b"".join(it) == b"1,2,"
    body.close()


def test_generator_response_has_no_content_length():
    r = client.get("/gen")
    assert r.body == b"0,1,2,"
    assert "Content-Length" not in r.headers


def test_file_goes_through_file_wrapper():
    seen = []

    def wrapper(f, size):
        seen.append(size)
        return iter(lambda: f.read(size), b"")
    r = client.request("GET", "/file", environ={"wsgi.file_wrapper": wrapper})
    assert seen == [65536]
    with open(__file__, "rb") as fh:
        assert r.body == fh.read()
    assert int(r.headers["Content-Length"]) == len(r.body)


def test_status_and_location():
    r = client.get("/status")
    assert r.status == "201 Created"
    assert r.headers["Location"] == "http://testserver/text"


def test_204_has_no_body_or_length():
    r = client.get("/nocontent")
    assert r.code == 204 and r.body == b"" and "Content-Length" not in r.headers


def test_head_has_headers_but_no_body():
    r = client.head("/text")
    assert r.code == 200 and r.body == b""
    assert r.headers["Content-Length"] == str(len("héllo".encode()))


def test_cookies_are_separate_headers():
    r = client.get("/cookie")
    assert sorted(r.header_values("Set-Cookie")) == ["a=1; Path=/", "b=2"]


def test_exception_is_plain_500_with_logged_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="hostsvc.web"):
        r = client.get("/crash")
    assert r.code == 500
    assert b"secret detail" not in r.body and b"Traceback" not in r.body
    assert "secret detail" in caplog.text and "Traceback" in caplog.text


def test_traceback_shown_only_in_debug():
    debug = Client(web.Application(Root(), config={"/": {"request.show_tracebacks": True}}))
    r = debug.get("/crash")
    assert r.code == 500 and b"Traceback" in r.body and b"secret detail" in r.body


def test_http_error_message_is_escaped():
    r = client.get("/teapot")
    assert r.status == "418 I'm a Teapot" or r.code == 418
    assert b"&lt;short &amp; stout&gt;" in r.body


def test_type_error_inside_handler_is_500_not_404():
    assert client.get("/typeerror_inside").code == 500


def test_error_page_file_and_callable(tmp_path):
    page = tmp_path / "404.html"
    page.write_text("custom %(status)s: %(message)s")

    def on_500(status, message, traceback, version):
        return f"sorry ({status})"
    app = web.Application(Root(), config={"/": {"error_page.404": str(page),
                                                "error_page.default": on_500}})
    c = Client(app)
    r = c.get("/nothing")
    assert r.code == 404 and r.text == "custom 404 Not Found: The path &#x27;/nothing&#x27; was not found."
    r = c.get("/crash")
    assert r.code == 500 and r.text == "sorry (500 Internal Server Error)"


def test_broken_error_page_falls_back_to_default(tmp_path):
    c = Client(web.Application(Root(), config={"/": {"error_page.404": str(tmp_path / "gone")}}))
    r = c.get("/nothing")
    assert r.code == 404 and b"404 Not Found" in r.body


@pytest.mark.parametrize("status", [200, 302, 600, "abc"])
def test_http_error_rejects_non_error_status(status):
    with pytest.raises(ValueError):
        web.HTTPError(status)


def test_redirect_statuses():
    class R:
        @web.expose
        def index(self, code=None):
            raise web.HTTPRedirect(["/a", "/b"], int(code) if code else None)
    c = Client(web.Application(R()))
    r = c.get("/")
    assert r.code == 303 and r.headers["Location"] == "http://testserver/a"
    r = c.get("/?code=307")
    assert r.code == 307 and b"http://testserver/a" in r.body
    r = c.get("/?code=300")
    assert r.code == 300 and b"/b" in r.body
    r = c.get("/?code=304")
    assert r.code == 304 and r.body == b"" and "Location" not in r.headers
