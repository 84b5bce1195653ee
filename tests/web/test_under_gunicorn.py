"""The framework under a real gunicorn (gthread), spoken to over HTTP on loopback."""
from __future__ import annotations

import gzip
import http.client
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.ports import free_port, wait_for_port

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", HERE, "--bind", f"127.0.0.1:{port}",
         "--workers", "1", "--threads", "4", "--worker-class", "gthread",
         "--log-level", "warning", "featured_app:application"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not wait_for_port(port, 20, lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError("gunicorn did not start: " + proc.communicate()[0].decode())
    yield port
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def test_routes_and_arguments(server):
    status, _, body = request(server, "GET", "/")
    assert (status, body) == (200, b"home")
    status, _, body = request(server, "GET", "/hello?name=gunicorn")
    assert (status, body) == (200, b"hello gunicorn")
    status, _, body = request(server, "GET", "/users/42/orders?limit=3")
    assert (status, body) == (200, b"orders for 42 (limit 3)")
    assert request(server, "GET", "/nothing")[0] == 404
    assert request(server, "GET", "/hello?bogus=1")[0] == 404


def test_redirects(server):
    status, headers, _ = request(server, "GET", "/docs?x=1")
    assert status == 301 and headers["location"] == f"http://127.0.0.1:{server}/docs/?x=1"
    status, headers, _ = request(server, "GET", "/moved")
    assert status == 303 and headers["location"].endswith("/hello?name=moved")


def test_rest_resource_with_json(server):
    nid = uuid.uuid4().hex[:8]
    status, headers, body = request(server, "PUT", f"/api/notes/{nid}", json.dumps({"text": "hi"}),
                                    {"Content-Type": "application/json"})
    assert status == 201 and json.loads(body) == {"id": nid}
    assert headers["location"].endswith(f"/api/notes/{nid}")
    status, headers, body = request(server, "GET", f"/api/notes/{nid}")
    assert status == 200 and json.loads(body) == {"id": nid, "text": "hi"}
    status, _, body = request(server, "GET", "/api/notes")
    assert status == 200 and nid in json.loads(body)
    assert headers["content-type"] == "application/json"
    status, headers, _ = request(server, "PATCH", f"/api/notes/{nid}")
    assert status == 405 and headers["allow"] == "GET, HEAD, PUT"
    status, _, body = request(server, "PUT", f"/api/notes/{nid}", "{broken",
                              {"Content-Type": "application/json"})
    assert status == 400 and b"Invalid JSON" in body


def test_multipart_upload_and_limit(server):
    boundary = "b0undary"
    payload = b"z" * 1000
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"doc\"; filename=\"z.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + \
        f"\r\n--{boundary}--\r\n".encode()
    status, _, data = request(server, "POST", "/upload", body,
                              {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert (status, data) == (200, b"z.bin:1000")
    big = b"x" * (70 * 1024)
    status, _, _ = request(server, "POST", "/upload", big,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413


def test_streaming_gzip_and_file_wrapper(server):
    status, headers, body = request(server, "GET", "/stream?n=50", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == "".join(f"line {i}\n" for i in range(50)).encode()
    status, headers, body = request(server, "GET", "/me")
    with open(os.path.join(HERE, "featured_app.py"), "rb") as fh:
        assert body == fh.read()
    assert int(headers["content-length"]) == len(body)


def test_crash_is_plain_500_and_worker_survives(server):
    status, _, body = request(server, "GET", "/crash")
    assert status == 500 and b"hidden" not in body and b"Traceback" not in body
    assert request(server, "GET", "/")[0] == 200


def test_proxy_tool_reads_forwarded_for(server):
    _, _, body = request(server, "GET", "/client", headers={"X-Forwarded-For": "203.0.113.9"})
    assert body == b"203.0.113.9"


def test_concurrent_requests_on_threads_keep_their_own_context(server):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: request(server, "GET", f"/hello?name=n{i}"), range(64)))
    assert [r[2] for r in results] == [f"hello n{i}".encode() for i in range(64)]


def test_oversized_body_gets_413_not_a_reset(server):
    """The app refuses the body unread; it drains it before answering, so the peer (nginx in
    production) is not reset mid-upload and sees the 413 instead of a broken connection."""
    big = b"x" * (8 * 1024 * 1024)
    for _ in range(3):
        status, _, body = request(server, "POST", "/upload", big,
                                  {"Content-Type": "multipart/form-data; boundary=b0undary"})
        assert status == 413 and b"larger than" in body


def test_body_lines_keep_their_newlines(server):
    status, _, body = request(server, "POST", "/lines", b"a\nbb\n\nc")
    assert (status, body) == (200, repr([b"a\n", b"bb\n", b"\n", b"c"]).encode())
