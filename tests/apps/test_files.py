"""The files example app: login with sessions, CSRF, uploads with limits, downloads."""
from __future__ import annotations

import re

import pytest

import files
from hostsvc.web.testing import Client


@pytest.fixture()
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("FILES_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("FILES_SESSION_DIR", str(tmp_path / "sessions"))
    monkeypatch.setenv("FILES_USERS", "ann:secret")
    monkeypatch.setenv("FILES_MAX_BYTES", "2000")
    monkeypatch.delenv("FILES_SESSION_REDIS", raising=False)
    return Client(files.make_app(), script_name="/files")


def multipart(fields, name="upload", filename="a.txt", data=b"hello"):
    b = "----b"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             for k, v in fields.items()]
    body = "".join(parts).encode() + (
        f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return {"body": body, "headers": {"Content-Type": f"multipart/form-data; boundary={b}"}}


def login(client):
    r = client.post("/login", form={"user": "ann", "password": "secret"})
    assert r.code == 303 and r.headers["Location"] == "http://testserver/files/"
    page = client.get("/")
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def test_anonymous_is_sent_to_login(client):
    r = client.get("/")
    assert r.code == 303 and r.headers["Location"] == "http://testserver/files/login"
    assert client.get("/download/x").code == 303


def test_wrong_password_is_403_and_sets_no_session(client):
    r = client.post("/login", form={"user": "ann", "password": "nope"})
    assert r.code == 403 and b"Wrong user name" in r.body
    assert client.get("/").code == 303


def test_login_regenerates_the_session_id(client):
    client.get("/login")
    client.cookies["session_id"] = "attacker-chosen-id"
    login(client)
    assert client.cookies["session_id"] != "attacker-chosen-id"


def test_upload_list_download(client):
    csrf = login(client)
    r = client.post("/upload", **multipart({"csrf": csrf}, filename="../../etc/passwd", data=b"x,y"))
    assert r.code == 303
    listing = client.get("/").text
    assert 'href="http://testserver/files/download/passwd"' in listing
    r = client.get("/download/passwd")
    assert r.code == 200 and r.body == b"x,y"
    assert r.headers["Content-Disposition"].startswith("attachment")
    # The same name again gets a new file, not an overwrite.
    client.post("/upload", **multipart({"csrf": csrf}, filename="passwd", data=b"2"))
    assert client.get("/download/passwd-2").body == b"2"
    assert client.get("/download/passwd").body == b"x,y"


def test_upload_needs_csrf_token_and_post(client):
    login(client)
    assert client.post("/upload", **multipart({"csrf": "forged"})).code == 403
    assert client.get("/upload").code == 405


def test_upload_over_limit_is_413(client):
    csrf = login(client)
    r = client.post("/upload", **multipart({"csrf": csrf}, data=b"z" * 5000))
    assert r.code == 413


def test_download_refuses_odd_names(client):
    login(client)
    assert client.get("/download/..%2f..%2fsecret").code == 404
    assert client.get("/download/.hidden").code == 404


def test_static_assets_are_public_and_cached(client):
    r = client.get("/static/site.css")
    assert r.code == 200 and r.headers["Cache-Control"] == "max-age=86400"
    assert "ETag" in r.headers
    again = client.get("/static/site.css", headers={"If-None-Match": r.headers["ETag"]})
    assert again.code == 304


def test_logout_ends_the_session(client):
    csrf = login(client)
    r = client.post("/logout", form={"csrf": csrf})
    assert r.code == 303
    assert client.get("/").code == 303
