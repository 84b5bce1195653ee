"""Request parsing: query strings, forms, multipart uploads, JSON bodies, limits, cookies."""
from __future__ import annotations

import io
import threading

import pytest

from hostsvc import web
from hostsvc.web.errors import HTTPError
from hostsvc.web.request import RequestBody
from hostsvc.web.testing import Client


class Root:
    @web.expose
    def echo(self, **kw):
        return repr(sorted((k, v if not isinstance(v, web.UploadedFile) else v.fullvalue())
                           for k, v in kw.items()))

    @web.expose
    def upload(self, doc, title=""):
        return f"{title}|{doc.filename}|{doc.content_type}|{doc.fullvalue().decode()}"

    @web.expose
    def info(self, **_query):
        r = web.request
        return "|".join([r.method, r.script_name, r.path_info, r.query_string,
                         r.headers.get("x-custom", "-"), r.remote.ip, r.base,
                         r.cookie["c"].value if "c" in r.cookie else "-"])

    @web.expose
    @web.tools.json_in()
    @web.tools.json_out()
    def json(self):
        return {"got": web.request.json}

    @web.expose
    def raw(self):
        return web.request.body.read()

    @web.expose
    def lazyjson(self):
        return str(web.request.json["n"] + 1)

    @web.expose
    def slow(self, tag):
        # Waits so that another thread's request overlaps this one.
        barrier.wait(timeout=5)
        return f"{tag}:{web.request.params['tag']}:{web.request.path_info}"


barrier = threading.Barrier(2)
client = Client(web.Application(Root(), config={"/": {"request.max_body_size": 1000}}))


def test_query_string_repeated_keys_become_lists():
    r = client.get("/echo?a=1&a=2&b=&c=x%20y")
    assert r.text == repr([("a", ["1", "2"]), ("b", ""), ("c", "x y")])


def test_urlencoded_form_merges_with_query():
    r = client.post("/echo?a=1", form={"a": "2", "b": "3"})
    assert r.text == repr([("a", ["1", "2"]), ("b", "3")])


def test_multipart_upload_gives_file_objects():
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhi\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"a.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\nfile body\r\n--{boundary}--\r\n")
    r = client.post("/upload", body=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.code == 200
    assert r.text == "hi|a.txt|text/plain|file body"


def test_malformed_multipart_is_400():
    r = client.post("/upload", body="--XyZ\r\ngarbage",
                    headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert r.code == 400
    r = client.post("/upload", body="x", headers={"Content-Type": "multipart/form-data"})
    assert r.code == 400
    assert b"boundary" in r.body


def test_body_over_limit_is_413():
    r = client.post("/raw", body=b"x" * 1001, headers={"Content-Type": "application/octet-stream"})
    assert r.code == 413
    r = client.post("/raw", body=b"x" * 1000, headers={"Content-Type": "application/octet-stream"})
    assert r.code == 200 and len(r.body) == 1000


def test_chunked_body_over_limit_is_413_while_reading():
    import io
    r = client.request("POST", "/raw", headers={"Transfer-Encoding": "chunked",
                                                "Content-Type": "application/octet-stream"},
                       environ={"wsgi.input": io.BytesIO(b"y" * 5000), "CONTENT_LENGTH": ""})
    assert r.code == 413
    r = client.request("POST", "/raw", headers={"Transfer-Encoding": "chunked",
                                                "Content-Type": "application/octet-stream"},
                       environ={"wsgi.input": io.BytesIO(b"y" * 900), "CONTENT_LENGTH": ""})
    assert r.code == 200 and r.body == b"y" * 900


def test_bad_content_length_is_400():
    r = client.request("POST", "/raw", body=b"abc", environ={"CONTENT_LENGTH": "x"},
                       headers={"Content-Type": "application/octet-stream"})
    assert r.code == 400


def test_json_in_and_out():
    r = client.post("/json", json={"a": [1, 2]})
    assert r.code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"got": {"a": [1, 2]}}


def test_json_in_rejects_malformed_and_wrong_type():
    r = client.post("/json", body="{nope", headers={"Content-Type": "application/json"})
    assert r.code == 400 and b"Invalid JSON" in r.body
    r = client.post("/json", body="a=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.code == 415


def test_request_json_without_tool():
    assert client.post("/lazyjson", json={"n": 41}).text == "42"
    assert client.post("/lazyjson", body="[", headers={"Content-Type": "application/json"}).code == 400


def test_invalid_utf8_in_query_or_path_is_400():
    assert client.get("/echo?a=%ff%fe").code == 400
    assert client.request("GET", "/echo", environ={"PATH_INFO": "/echo\xff"}).code == 400
    assert client.post("/echo", body=b"a=%ff", headers={
        "Content-Type": "application/x-www-form-urlencoded"}).code == 400


def test_malformed_percent_escapes_are_400():
    assert client.get("/echo?a=%zz").code == 400
    assert client.get("/echo?a=100%").code == 400
    assert client.get("/echo?a=100%25").text == repr([("a", "100%")])
    r = client.request("GET", "/echo", environ={"RAW_URI": "/ec%zho"})
    assert r.code == 400


def test_request_attributes_and_headers():
    r = client.get("/info?q=1", headers={"X-Custom": "yes", "Cookie": "c=cookie; bad"})
    assert r.text == "GET||/info|q=1|yes|127.0.0.1|http://testserver|cookie"


# Names header() reads straight from the environ, then names it leaves to `headers`.
PLAIN_NAMES = ["X-Custom", "x-custom", "HOST", "X-Under", "X-Missing", "Cookie"]
DEFERRED_NAMES = ["Content-Type", "content-length", "X_Under", "X-Cüstom"]


def test_header_reads_one_header_as_headers_would():
    class T:
        @web.expose
        def one(self):
            values = [web.request.header(name) for name in PLAIN_NAMES]
            built = "headers" in web.request.__dict__
            values += [web.request.header(name) for name in DEFERRED_NAMES]
            return repr((built, values))

        @web.expose
        def full(self):
            return repr((False, [web.request.headers.get(name)
                                 for name in PLAIN_NAMES + DEFERRED_NAMES]))

    c = Client(web.Application(T()))
    sent = {"X-Custom": "yes", "Content-Type": "text/plain", "X_Under": "u", "Cookie": "a=b"}
    environ = {"HTTP_CONTENT_TYPE": "sneaky", "HTTP_X_CÜSTOM": "ü"}
    one = c.post("/one", body="hi", headers=sent, environ=environ)
    full = c.post("/full", body="hi", headers=sent, environ=environ)
    assert one.code == full.code == 200
    assert one.text == full.text  # and the plain names did not build `headers`
    assert eval(one.text)[1][:3] == ["yes", "yes", "testserver"]


def test_header_sees_what_a_tool_changed_in_headers():
    def rewrite():
        web.request.headers["X-Custom"] = "rewritten"

    web.tools.rewrite_header = web.Tool("on_start_resource", rewrite)

    class T:
        @web.expose
        @web.tools.rewrite_header()
        def index(self):
            return web.request.header("X-Custom")

    c = Client(web.Application(T()))
    assert c.get("/", headers={"X-Custom": "sent"}).text == "rewritten"


def test_header_name_caches_stay_bounded():
    """Clients choose header names, so the caches of their spellings must not grow forever."""
    from hostsvc.web.request import (_ENVIRON_KEYS, _HEADER_NAMES, _NAME_CACHE_LIMIT,
                                     _environ_key, _header_name)

    for i in range(_NAME_CACHE_LIMIT + 10):
        _header_name(f"HTTP_X_{i}")
        _environ_key(f"X-{i}")
    assert 0 < len(_HEADER_NAMES) <= _NAME_CACHE_LIMIT
    assert 0 < len(_ENVIRON_KEYS) <= _NAME_CACHE_LIMIT
    assert _header_name("HTTP_X_LAST_ONE") == "X-Last-One"
    assert _environ_key("X-Last-One") == "HTTP_X_LAST_ONE"


class ReadOnlyInput(io.BytesIO):
    """A wsgi.input whose readline() must not be used (granian's loses data)."""

    def readline(self, *args):
        raise AssertionError("the server's readline() was called")


def test_body_lines_come_from_read_and_mix_with_reads():
    body = RequestBody(ReadOnlyInput(b"ab\ncd\n\nefgh"), 11, 0)
    assert body.readline() == b"ab\n"
    assert body.read(1) == b"c"
    assert body.readline(1) == b"d"
    assert body.readline(5) == b"\n"
    assert list(body) == [b"\n", b"efgh"]
    assert (body.readline(), body.read()) == (b"", b"")
    assert body._read == 11  # all of Content-Length taken: nothing left to drain


def test_body_read_hands_out_what_readline_took_first():
    body = RequestBody(ReadOnlyInput(b"line\n" + b"x" * 20000), None, 0)
    assert body.readline() == b"line\n"
    assert body._read == 8192  # a block was taken from the stream
    assert body.read(3) == b"xxx"
    assert body.read() == b"x" * 19997


def test_body_line_over_the_size_limit_is_413():
    body = RequestBody(ReadOnlyInput(b"y" * 20000), None, 10000)
    with pytest.raises(HTTPError) as err:
        body.readline()
    assert err.value.code == 413


def test_utf8_path_segments_are_decoded_once():
    class T:
        @web.expose
        def default(self, *parts):
            return "/".join(parts)
    c = Client(web.Application(T()))
    # %25 decodes once to a literal "%": never twice into something else.
    assert c.get("/caf%C3%A9/100%2541").text == "café/100%41"


def test_request_context_is_per_thread():
    c2 = Client(web.Application(Root()))
    results = []
    t = threading.Thread(target=lambda: results.append(c2.get("/slow?tag=A").text))
    t.start()
    results.append(client.get("/slow?tag=B").text)
    t.join(5)
    assert sorted(results) == ["A:A:/slow", "B:B:/slow"]
