"""notes: a REST JSON API on hostsvc.web's MethodDispatcher, persisted in SQLite.

    GET    /notes/         list
    POST   /notes/         create {"title", "body"}         -> 201 + Location
    GET    /notes/<id>     read                             -> 404 if missing
    PUT    /notes/<id>     update {"title", "body", "version"} (or If-Match: "<version>")
                                                            -> 409 if the version is stale
    DELETE /notes/<id>     delete                           -> 204
    GET    /openapi.json   this API, described

Malformed JSON is a 400; well-formed JSON of the wrong shape is a 422 listing what is
wrong. The database file is $NOTES_DB (default: a file in the temp dir).
"""
from __future__ import annotations

from typing import Any

from hostsvc import web

from .openapi import SPEC
from .store import Conflict, NoteStore


def _note_id(raw: str) -> int:
    if not raw.isdigit():
        raise web.NotFound()
    return int(raw)


def _payload(require_version: bool) -> dict[str, Any]:
    """The request's JSON object, checked against the note shape (422 when it does not fit)."""
    data = web.request.json
    errors = []
    if not isinstance(data, dict):
        raise web.HTTPError(422, "The body must be a JSON object.")
    if not isinstance(data.get("title"), str) or not data["title"].strip():
        errors.append("title: a non-empty string is required")
    if not isinstance(data.get("body", ""), str):
        errors.append("body: must be a string")
    if require_version and "version" in data and (
            not isinstance(data["version"], int) or isinstance(data["version"], bool)):
        errors.append("version: must be an integer")
    unknown = sorted(set(data) - {"title", "body", "version", "id", "updated_at"})
    if unknown:
        errors.append(f"unknown fields: {', '.join(unknown)}")
    if errors:
        raise web.HTTPError(422, "; ".join(errors))
    return data


def _etag(note: dict[str, Any]) -> str:
    return f'"{note["version"]}"'


@web.expose
class Notes:
    """The notes collection and its members, one method per HTTP verb."""

    def __init__(self, store: NoteStore) -> None:
        self.store = store

    def GET(self, note_id: str | None = None) -> Any:
        if note_id is None:
            return self.store.list()
        note = self.store.get(_note_id(note_id))
        if note is None:
            raise web.NotFound()
        web.response.headers["ETag"] = _etag(note)
        return note

    def POST(self) -> Any:
        data = _payload(require_version=False)
        note = self.store.create(data["title"], data.get("body", ""))
        web.response.status = 201
        web.response.headers["Location"] = web.url(f"/notes/{note['id']}")
        web.response.headers["ETag"] = _etag(note)
        return note

    def PUT(self, note_id: str) -> Any:
        nid = _note_id(note_id)
        data = _payload(require_version=True)
        version = data.get("version")
        if_match = web.request.headers.get("If-Match", "").strip('" ')
        if version is None and if_match.isdigit():
            version = int(if_match)
        if version is None:
            raise web.HTTPError(428, "Say which version you are updating: a \"version\" "
                                     "field or an If-Match header.")
        try:
            note = self.store.update(nid, data["title"], data.get("body", ""), version)
        except Conflict as conflict:
            web.response.headers["ETag"] = _etag(conflict.current)
            raise web.HTTPError(409, f"Note {nid} is at version {conflict.current['version']}, "
                                     f"not {version}: read it again and retry.") from None
        if note is None:
            raise web.NotFound()
        web.response.headers["ETag"] = _etag(note)
        return note

    def DELETE(self, note_id: str) -> None:
        if not self.store.delete(_note_id(note_id)):
            raise web.NotFound()
        web.response.status = 204


class Root:
    def __init__(self, store: NoteStore | None = None) -> None:
        self.notes = Notes(store or NoteStore())

    @web.expose
    def index(self) -> str:
        return ("<h1>notes</h1><p>A JSON API: <a href='notes/'>notes/</a>, described in "
                "<a href='openapi.json'>openapi.json</a>.</p>")

    @web.expose
    @web.tools.json_out()
    def openapi_json(self) -> dict[str, Any]:
        return dict(SPEC, servers=[{"url": web.url("/").rstrip("/")}])


CONFIG = {
    # json_in answers 415 for bodies that are not JSON and 400 for malformed JSON.
    "/notes": {"request.dispatch": "method", "tools.json_in.on": True,
               "tools.json_out.on": True},
}


def make_app(store: NoteStore | None = None) -> web.Application:
    return web.Application(Root(store), config=CONFIG)


application = make_app()
