"""The notes example app: REST semantics, validation, concurrency, across processes."""
from __future__ import annotations

import multiprocessing
import threading

import pytest

import notes
from notes.store import NoteStore
from hostsvc.web.testing import Client


@pytest.fixture()
def client(tmp_path):
    return Client(notes.make_app(NoteStore(str(tmp_path / "notes.db"))), script_name="/notes-app")


def test_create_read_list_delete(client):
    r = client.post("/notes/", json={"title": "first", "body": "hello"})
    assert r.code == 201
    note = r.json()
    assert r.headers["Location"] == f"http://testserver/notes-app/notes/{note['id']}"
    assert note["title"] == "first" and note["version"] == 1
    r = client.get(f"/notes/{note['id']}")
    assert r.code == 200 and r.json() == note and r.headers["ETag"] == '"1"'
    assert [n["id"] for n in client.get("/notes/").json()] == [note["id"]]
    assert client.delete(f"/notes/{note['id']}").code == 204
    assert client.get(f"/notes/{note['id']}").code == 404
    assert client.delete(f"/notes/{note['id']}").code == 404


def test_update_with_version_and_conflict(client):
    nid = client.post("/notes/", json={"title": "a"}).json()["id"]
    r = client.put(f"/notes/{nid}", json={"title": "b", "version": 1})
    assert r.code == 200 and r.json()["version"] == 2
    r = client.put(f"/notes/{nid}", json={"title": "c", "version": 1})
    assert r.code == 409 and r.headers["ETag"] == '"2"'
    r = client.put(f"/notes/{nid}", json={"title": "c"}, headers={"If-Match": '"2"'})
    assert r.code == 200 and r.json()["title"] == "c"
    assert client.put(f"/notes/{nid}", json={"title": "d"}).code == 428
    assert client.put("/notes/999", json={"title": "d", "version": 1}).code == 404


@pytest.mark.parametrize("body,ctype,code", [
    ('{"title": ', "application/json", 400),
    ("[1, 2]", "application/json", 422),
    ('{"title": ""}', "application/json", 422),
    ('{"title": "x", "body": 5}', "application/json", 422),
    ('{"title": "x", "extra": 1}', "application/json", 422),
    ("title=x", "application/x-www-form-urlencoded", 415),
])
def test_bad_input_is_4xx(client, body, ctype, code):
    r = client.post("/notes/", body=body, headers={"Content-Type": ctype})
    assert r.code == code
    assert b"Traceback" not in r.body


def test_methods_and_allow(client):
    r = client.patch("/notes/1")
    assert r.code == 405 and r.headers["Allow"] == "DELETE, GET, HEAD, POST, PUT"
    assert client.get("/notes/abc").code == 404


def test_openapi_describes_the_paths(client):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {"/notes/", "/notes/{note_id}"}
    assert spec["servers"] == [{"url": "http://testserver/notes-app"}]


def test_concurrent_writers_never_lose_an_update(tmp_path):
    """Threads racing on one note: every successful update bumps the version exactly once."""
    store = NoteStore(str(tmp_path / "race.db"))
    nid = store.create("race", "")["id"]
    wins = []

    def worker():
        for _ in range(20):
            while True:
                current = store.get(nid)
                try:
                    store.update(nid, "race", current["body"] + "x", current["version"])
                    wins.append(1)
                    break
                except notes.store.Conflict:
                    continue
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    final = store.get(nid)
    assert len(wins) == 80
    assert final["version"] == 81 and len(final["body"]) == 80


def _create_many(path: str, n: int) -> None:
    store = NoteStore(path)
    for i in range(n):
        store.create(f"p{i}", "")


def test_several_processes_share_the_database(tmp_path):
    path = str(tmp_path / "procs.db")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_create_many, args=(path, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(NoteStore(path).list()) == 150
