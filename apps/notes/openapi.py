"""The OpenAPI 3.1 description served at /openapi.json."""
from __future__ import annotations

_NOTE = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "title": {"type": "string"},
        "body": {"type": "string"},
        "version": {"type": "integer"},
        "updated_at": {"type": "number", "description": "Unix time"},
    },
    "required": ["id", "title", "body", "version", "updated_at"],
}
_INPUT = {
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 1}, "body": {"type": "string"},
                   "version": {"type": "integer"}},
    "required": ["title"],
}
_ID = [{"name": "note_id", "in": "path", "required": True, "schema": {"type": "integer"}}]
_JSON_NOTE = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Note"}}}}
_BODY = {"required": True,
         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NoteInput"}}}}

SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "hostsvc notes", "version": "1.0.0",
             "description": "Example REST API served by hostsvc.web's MethodDispatcher."},
    "paths": {
        "/notes/": {
            "get": {"summary": "List notes", "responses": {"200": {
                "description": "All notes", "content": {"application/json": {"schema": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Note"}}}}}}},
            "post": {"summary": "Create a note", "requestBody": _BODY, "responses": {
                "201": dict(_JSON_NOTE, description="Created; Location names it"),
                "400": {"description": "Malformed JSON"},
                "415": {"description": "Not application/json"},
                "422": {"description": "JSON of the wrong shape"}}},
        },
        "/notes/{note_id}": {
            "parameters": _ID,
            "get": {"summary": "Read a note", "responses": {
                "200": dict(_JSON_NOTE, description="The note"),
                "404": {"description": "No such note"}}},
            "put": {"summary": "Update a note at a known version", "requestBody": _BODY,
                    "responses": {
                        "200": dict(_JSON_NOTE, description="Updated"),
                        "404": {"description": "No such note"},
                        "409": {"description": "The note changed since that version"},
                        "422": {"description": "JSON of the wrong shape"},
                        "428": {"description": "No version given"}}},
            "delete": {"summary": "Delete a note", "responses": {
                "204": {"description": "Deleted"}, "404": {"description": "No such note"}}},
        },
    },
    "components": {"schemas": {"Note": _NOTE, "NoteInput": _INPUT}},
}
