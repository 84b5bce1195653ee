"""Every example app of config/hostsvc.yaml, over HTTP through the running stack
(`hostsvc run` with real nginx, gunicorn pools and the metrics server: the `stack`
fixture in conftest.py)."""
from __future__ import annotations

import http.client
import json
import re

import pytest
import yaml

from support.paths import DEFAULT_CONFIG as CONFIG
from harness import wait_for


def app_names() -> set[str]:
    """The app names the config file declares (names, or derived from prefixes)."""
    from hostsvc.config import load
    return {a.name for a in load(CONFIG).apps}


# -- hello ---------------------------------------------------------------------------------
def test_hello_index_path_arg_query_arg_and_redirect(stack):
    status, _, body = stack.request("/hello/", headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 200 and body.startswith(b"Hello from hostsvc! You are 127.0.0.1")
    assert stack.request("/hello/greet/Ada")[2] == b"Hello, Ada!\n"
    assert stack.request("/hello/greet?name=Bob")[2] == b"Hello, Bob!\n"
    status, headers, _ = stack.request("/hello/home")
    assert status == 303 and headers["location"] == f"http://127.0.0.1:{stack.port}/hello/"
    status, headers, _ = stack.request("/hello")        # nginx adds the slash
    assert status == 301 and headers["location"].endswith("/hello/")


def test_static_mount_is_served_by_nginx_with_expiry(stack):
    status, headers, body = stack.request("/static/")
    assert status == 200 and b"<" in body
    assert "max-age=3600" in headers.get("cache-control", "")


# -- plain WSGI ------------------------------------------------------------------------------
def test_plain_wsgi_sees_its_prefix_and_env(stack):
    status, headers, body = stack.request("/plain/any/path?x=1")
    assert status == 200 and headers["content-type"] == "text/plain"
    assert body == (b"plain wsgi: script_name='/plain' path_info='/any/path' "
                    b"greeting=hello from the environment\n")


# -- notes -----------------------------------------------------------------------------------
def send_json(stack, method, path, data=None, raw=None, headers=None):
    body = raw if raw is not None else (None if data is None else json.dumps(data).encode())
    h = {"Content-Type": "application/json", **(headers or {})}
    status, rh, rb = stack.request(path, method=method, body=body, headers=h)
    return status, rh, (json.loads(rb) if rb and rh.get("content-type", "").startswith(
        "application/json") else rb)


def test_notes_create_read_update_conflict(stack):
    status, headers, note = send_json(stack, "POST", "/notes/notes/",
                                      {"title": "first", "body": "via nginx"})
    assert status == 201
    assert headers["location"] == f"http://127.0.0.1:{stack.port}/notes/notes/{note['id']}"
    path = headers["location"].split(str(stack.port), 1)[1]
    status, headers, got = send_json(stack, "GET", path)
    assert status == 200 and got["title"] == "first" and got["body"] == "via nginx"
    assert headers["etag"] == f'"{got["version"]}"'

    status, _, updated = send_json(stack, "PUT", path, {"title": "second", "body": "",
                                                        "version": got["version"]})
    assert status == 200 and updated["version"] == got["version"] + 1
    status, headers, _ = send_json(stack, "PUT", path, {"title": "stale", "body": "",
                                                        "version": got["version"]})
    assert status == 409 and headers["etag"] == f'"{updated["version"]}"'
    assert send_json(stack, "GET", path)[2]["title"] == "second"
    listed = send_json(stack, "GET", "/notes/notes/")[2]
    assert any(n["id"] == note["id"] for n in listed)   # the SQLite file is shared by workers


def test_notes_rejects_bad_requests(stack):
    status, headers, _ = send_json(stack, "PATCH", "/notes/notes/", {"title": "x"})
    assert status == 405 and "POST" in headers["allow"]
    assert send_json(stack, "POST", "/notes/notes/", raw=b"{not json")[0] == 400
    status, _, body = send_json(stack, "POST", "/notes/notes/", {"title": "", "extra": 1})
    assert status == 422 and b"title" in body and b"extra" in body
    assert send_json(stack, "GET", "/notes/notes/999999")[0] == 404


def test_notes_openapi(stack):
    status, _, spec = send_json(stack, "GET", "/notes/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert spec["servers"] == [{"url": f"http://127.0.0.1:{stack.port}/notes"}]
    assert {"/notes/", "/notes/{note_id}"} <= set(spec["paths"])


# -- files -----------------------------------------------------------------------------------
BOUNDARY = "----hostsvc-stack-test"


def multipart(csrf: str, filename: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{csrf}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture(scope="module")
def files_session(stack):
    """Logged in as the default demo user: (cookie header, csrf token)."""
    status, headers, _ = stack.request("/files/")
    assert status == 303 and headers["location"].endswith("/files/login")
    status, headers, _ = stack.request(
        "/files/login", method="POST", body=b"user=demo&password=demo",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303, status
    cookie = headers["set-cookie"].split(";", 1)[0]
    status, _, page = stack.request("/files/", headers={"Cookie": cookie})
    assert status == 200 and b"Files of demo" in page
    return cookie, re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()


def test_files_upload_list_download(stack, files_session):
    cookie, csrf = files_session
    data = bytes(range(256)) * 40
    body, headers = multipart(csrf, "report.bin", data)
    status, rh, _ = stack.request("/files/upload", method="POST", body=body,
                                  headers={**headers, "Cookie": cookie})
    assert status == 303 and rh["location"].endswith("/files/")
    page = stack.request("/files/", headers={"Cookie": cookie})[2]
    assert b'href="http://127.0.0.1:%d/files/download/report.bin"' % stack.port in page
    status, rh, got = stack.request("/files/download/report.bin", headers={"Cookie": cookie})
    assert status == 200 and got == data
    assert "attachment" in rh["content-disposition"]
    assert (stack.data_dir / "files" / "report.bin").read_bytes() == data
    # anonymous clients get nothing
    assert stack.request("/files/download/report.bin")[0] == 303


def test_files_upload_over_the_limits_is_413(stack, files_session):
    cookie, csrf = files_session
    body, headers = multipart(csrf, "big.bin", b"x" * (5 * 1024 * 1024 + 4096))
    # The app's own 5 MiB limit: it answers from the Content-Length and drains the body it
    # did not need, so nginx (still sending it) sees the 413, never a reset (502 -> 503).
    for _ in range(5):
        status = stack.request("/files/upload", method="POST", body=body,
                               headers={**headers, "Cookie": cookie})[0]
        assert status == 413
    # Over nginx's client_max_body_size (6m): nginx answers from the Content-Length alone.
    # Only the headers are sent, so the answer cannot race the upload (a client still
    # sending when nginx closes would see a reset instead of the 413).
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.putrequest("POST", "/files/upload")
        for name, value in {**headers, "Cookie": cookie,
                            "Content-Length": str(7 * 1024 * 1024)}.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and b"nginx" in resp.read()
    finally:
        conn.close()
    assert not (stack.data_dir / "files" / "big.bin").exists()
    assert not (stack.data_dir / "files" / "huge.bin").exists()


def test_files_static_has_caching_headers(stack):
    status, headers, body = stack.request("/files/static/site.css")
    assert status == 200 and headers["content-type"].startswith("text/css") and body
    assert "max-age=86400" in headers["cache-control"]
    assert headers.get("etag") and headers.get("last-modified") and headers.get("expires")
    status, _, body = stack.request("/files/static/site.css",
                                    headers={"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""


# -- status ----------------------------------------------------------------------------------
def status_json(stack) -> dict:
    status, headers, body = stack.request("/status/api/status")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert headers["cache-control"] == "no-store"
    return json.loads(body)


def test_status_json_lists_every_configured_app_running(stack):
    doc = status_json(stack)
    assert doc["state_error"] is None and doc["supervisor"]["running"] is True
    assert doc["metrics"]["ok"] is True, doc["metrics"]
    assert doc["metrics"]["source"] == "state.json"          # found through state.json
    assert doc["metrics"]["url"] == f"http://127.0.0.1:{stack.metrics_port}/metrics"
    apps = {a["name"]: a for a in doc["apps"]}
    assert set(apps) == app_names()
    declared = yaml.safe_load(CONFIG.read_text())["apps"]
    for entry in declared:
        name = entry.get("name")
        if name:
            assert apps[name]["prefix"] == entry.get("prefix", f"/{name}")
    for app in apps.values():
        assert app["state"] == "running", app
        assert app["workers_alive"] == app["workers"] >= 1
        assert app["restarts"] == 0


def test_status_counts_and_rates_follow_traffic(stack):
    before = {a["name"]: a for a in status_json(stack)["apps"]}["plain"]
    for _ in range(12):
        assert stack.request("/plain/")[0] == 200
    for _ in range(3):
        assert stack.request("/notes/notes/x-not-a-number")[0] == 404

    def counted():
        doc = {a["name"]: a for a in status_json(stack)["apps"]}
        return doc if doc["plain"]["requests_total"] >= before["requests_total"] + 12 else None
    apps = wait_for(counted, timeout=15, what="the plain app's requests in /metrics")
    window = apps["plain"]["window"]
    assert window is not None and window["requests"] >= 12 and window["rate_per_s"] > 0
    assert window["error_ratio"] == 0.0
    assert window["latency_p50_ms"] is not None
    assert 0 < window["latency_p50_ms"] <= window["latency_p95_ms"]


def test_status_page_and_root_redirect(stack):
    status, headers, _ = stack.request("/")
    assert status == 302 and headers["location"].endswith("/status/")
    status, headers, page = stack.request("/status/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for asset in re.findall(rb'(?:src|href)="(static/[^"]+)"', page):
        status, headers, body = stack.request("/status/" + asset.decode())
        assert status == 200 and body, asset
    assert b"api/status" in page
    assert stack.request("/no-such-app/")[0] == 404
