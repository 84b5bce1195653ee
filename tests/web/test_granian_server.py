"""The framework under a real granian (issue #7's engine), spoken to over HTTP on loopback.

granian builds a different environ from gunicorn's: its own `wsgi.input` type, no
`wsgi.file_wrapper`, no RAW_URI or REMOTE_PORT, chunked request bodies without
CONTENT_LENGTH, and a copy of the server's os.environ. The featured tree is served
mounted at /app (the application moves the prefix into SCRIPT_NAME) and checked for
routing, arguments, bodies, streams, files, error pages, redirects and HEAD.
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import pytest

from support.ports import free_port, wait_for_port

pytest.importorskip("granian")

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "featured_app.py"), "rb") as _fh:
    FEATURED_SOURCE = _fh.read()


@pytest.fixture(scope="module")
def server():
    """granian with 4 Python threads in its worker, so requests overlap in one process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--blocking-threads", "4", "--no-ws",
         "--log-level", "warning", "--working-dir", HERE, "featured_app:mounted"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not wait_for_port(port, 20, lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError("granian did not start: " + proc.communicate()[0].decode())
    yield port
    proc.terminate()  # SIGTERM: granian's graceful stop
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()


def request(port: int, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; an iterable body is sent chunked."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {},
                 encode_chunked=body is not None and not isinstance(body, bytes))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def multipart(payload: bytes, boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"doc\"; "
            f"filename=\"z.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() \
        + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def chunks(data: bytes, size: int = 7) -> Iterable[bytes]:
    return (data[i:i + size] for i in range(0, len(data), size))


def test_routes_query_arguments_and_popargs(server):
    assert request(server, "GET", "/app/")[::2] == (200, b"home")
    assert request(server, "GET", "/app/hello?name=granian")[::2] == (200, b"hello granian")
    assert request(server, "GET", "/app/hello?name=caf%C3%A9")[2] == "hello café".encode()
    assert request(server, "GET", "/app/users/42/orders?limit=3")[::2] == \
        (200, b"orders for 42 (limit 3)")
    assert request(server, "GET", "/app/hello?bogus=1")[0] == 404


def test_path_escapes(server):
    assert request(server, "GET", "/app/hello/caf%C3%A9%2541")[2] == "hello café%41".encode()
    assert request(server, "GET", "/app/hello/%FF")[0] == 400  # not UTF-8
    # granian gives no RAW_URI, so a malformed escape cannot be told from "%25zz" and
    # arrives as text (gunicorn's RAW_URI makes it a 400): see docs/web.md.
    assert request(server, "GET", "/app/hello/%zz")[::2] == (200, b"hello %zz")


def test_mount_prefix_is_script_name(server):
    assert request(server, "GET", "/app/where")[2] == \
        f"/app|/where|http://127.0.0.1:{server}/app/x".encode()
    # Outside the prefix the application serves the path as it is.
    assert request(server, "GET", "/where")[2] == f"|/where|http://127.0.0.1:{server}/x".encode()


def test_form_and_json_bodies(server):
    status, _, body = request(server, "POST", "/app/hello", b"name=form%20post",
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert (status, body) == (200, b"hello form post")
    nid = uuid.uuid4().hex[:8]
    status, headers, body = request(server, "PUT", f"/app/api/notes/{nid}",
                                    json.dumps({"text": "hi"}).encode(),
                                    {"Content-Type": "application/json"})
    assert status == 201 and json.loads(body) == {"id": nid}
    assert headers["location"] == f"http://127.0.0.1:{server}/app/api/notes/{nid}"
    status, _, body = request(server, "GET", f"/app/api/notes/{nid}")
    assert status == 200 and json.loads(body) == {"id": nid, "text": "hi"}
    status, _, body = request(server, "PUT", f"/app/api/notes/{nid}", b"{broken",
                              {"Content-Type": "application/json"})
    assert status == 400 and b"Invalid JSON" in body


def test_chunked_request_bodies(server):
    nid = uuid.uuid4().hex[:8]
    status, _, _ = request(server, "PUT", f"/app/api/notes/{nid}",
                           chunks(json.dumps({"text": "chunked"}).encode()),
                           {"Content-Type": "application/json"})
    assert status == 201
    assert json.loads(request(server, "GET", f"/app/api/notes/{nid}")[2])["text"] == "chunked"
    body, headers = multipart(b"z" * 5000)
    assert request(server, "POST", "/app/upload", chunks(body, 1000), headers)[::2] == \
        (200, b"z.bin:5000")
    body, headers = multipart(b"z" * (70 * 1024))   # over the tree's 64 KiB limit
    assert request(server, "POST", "/app/upload", chunks(body, 8192), headers)[0] == 413


def test_body_lines_keep_their_newlines(server):
    """granian 2.8's wsgi.input.readline() drops the newline and then reports the end of
    the body; request.body reads lines on top of read(), so they arrive whole."""
    data = b"first\nsecond line\n\nlast, no newline"
    expected = repr([b"first\n", b"second line\n", b"\n", b"last, no newline"]).encode()
    assert request(server, "POST", "/app/lines", data)[::2] == (200, expected)
    assert request(server, "POST", "/app/lines", chunks(data, 4))[::2] == (200, expected)


def test_streamed_body_with_and_without_gzip(server):
    text = "".join(f"line {i}\n" for i in range(50)).encode()
    status, headers, body = request(server, "GET", "/app/stream?n=50")
    assert (status, body) == (200, text)
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    status, headers, body = request(server, "GET", "/app/stream?n=50",
                                    headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == text


def test_file_bodies_without_a_file_wrapper(server):
    status, headers, body = request(server, "GET", "/app/me")
    assert (status, body) == (200, FEATURED_SOURCE)
    assert int(headers["content-length"]) == len(FEATURED_SOURCE)


def test_static_files_ranges_and_conditionals(server):
    status, headers, body = request(server, "GET", "/app/static/featured_app.py")
    assert (status, body) == (200, FEATURED_SOURCE)
    assert headers["content-type"] == "text/x-python" and "etag" in headers
    status, headers, body = request(server, "GET", "/app/static/featured_app.py",
                                    headers={"Range": "bytes=4-13"})
    assert (status, body) == (206, FEATURED_SOURCE[4:14])
    assert headers["content-range"] == f"bytes 4-13/{len(FEATURED_SOURCE)}"
    etag = request(server, "GET", "/app/static/featured_app.py")[1]["etag"]
    status, _, body = request(server, "GET", "/app/static/featured_app.py",
                              headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")
    # granian passes ".." through undecoded-and-unresolved; the tool refuses it.
    assert request(server, "GET", "/app/static/../featured_app.py")[0] == 403
    assert request(server, "GET", "/app/static/nothing.txt")[0] == 404


def test_error_pages(server):
    status, _, body = request(server, "GET", "/app/nothing")
    assert status == 404 and body.startswith(b"<h1>Nothing here</h1><p>404 Not Found: ")
    status, _, body = request(server, "GET", "/app/crash")
    assert status == 500 and b"hidden" not in body and b"Traceback" not in body
    assert request(server, "GET", "/app/")[0] == 200


def test_redirects(server):
    status, headers, _ = request(server, "GET", "/app/docs?x=1")
    assert status == 301 and headers["location"] == f"http://127.0.0.1:{server}/app/docs/?x=1"
    # As in CherryPy, a redirect to "/path" is from the server's root, not the mount's.
    status, headers, _ = request(server, "GET", "/app/moved")
    assert status == 303 and headers["location"] == f"http://127.0.0.1:{server}/hello?name=moved"


@pytest.mark.parametrize("path", ["/app/hello?name=head", "/app/me", "/app/stream?n=5",
                                  "/app/static/featured_app.py"])
def test_head_answers_headers_without_a_body(server, path):
    get_status, get_headers, get_body = request(server, "GET", path)
    status, headers, body = request(server, "HEAD", path)
    assert (status, body) == (get_status, b"")
    assert headers.get("content-length") == get_headers.get("content-length")
    assert headers["content-type"] == get_headers["content-type"]
    assert get_body


def test_proxy_tool_reads_forwarded_for(server):
    assert request(server, "GET", "/app/client",
                   headers={"X-Forwarded-For": "10.0.0.1, 203.0.113.9"})[2] == b"203.0.113.9"


def test_concurrent_requests_keep_their_own_context(server):
    def get(i: int) -> Any:
        return request(server, "GET", f"/app/hello?name=n{i}")[2]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(get, range(64)))
    assert results == [f"hello n{i}".encode() for i in range(64)]


def test_oversized_body_gets_413_not_a_reset(server):
    big = b"x" * (8 * 1024 * 1024)
    for _ in range(3):
        status, _, body = request(server, "POST", "/app/upload", big,
                                  {"Content-Type": "multipart/form-data; boundary=b0undary"})
        assert status == 413 and b"larger than" in body
