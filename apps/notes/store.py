"""Notes persisted in SQLite, safe to share between worker processes and threads.

WAL mode lets readers run while one process writes; a busy timeout makes concurrent
writers wait instead of failing; one connection per thread, since sqlite3 connections
must not cross threads. Optimistic concurrency: every note has a version, and an update
names the version it read, so two clients editing at once cannot silently overwrite
each other (the loser gets a conflict).
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import tempfile
import threading
import time
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    body TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 1,
    updated_at REAL NOT NULL
)
"""


class Conflict(Exception):
    """The note changed since the client read it."""

    def __init__(self, current: dict[str, Any]) -> None:
        super().__init__("version conflict")
        self.current = current


def default_path() -> str:
    return os.environ.get("NOTES_DB") or os.path.join(tempfile.gettempdir(),
                                                      "hostsvc-notes.sqlite3")


class NoteStore:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_path()
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            # Workers starting together on a new file race to switch it to WAL and create
            # the table, and SQLite answers "database is locked" at once (no busy wait)
            # for the journal-mode switch: set the file up under a lock of our own.
            with open(self.path + ".init-lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA busy_timeout=10000")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
            self._local.db = db
        return db

    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        return dict(row) if row is not None else None

    def list(self) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT * FROM notes ORDER BY id").fetchall()
        return [dict(r) for r in rows]

    def get(self, note_id: int) -> dict[str, Any] | None:
        return self._row(self._db().execute("SELECT * FROM notes WHERE id = ?",
                                            (note_id,)).fetchone())

    def create(self, title: str, body: str) -> dict[str, Any]:
        cur = self._db().execute(
            "INSERT INTO notes (title, body, updated_at) VALUES (?, ?, ?)",
            (title, body, time.time()))
        return self.get(int(cur.lastrowid))  # type: ignore[return-value,arg-type]

    def update(self, note_id: int, title: str, body: str, version: int
               ) -> dict[str, Any] | None:
        """Update if still at `version`; None if the note does not exist; Conflict if stale."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            current = self.get(note_id)
            if current is None:
                db.execute("ROLLBACK")
                return None
            if current["version"] != version:
                db.execute("ROLLBACK")
                raise Conflict(current)
            db.execute("UPDATE notes SET title = ?, body = ?, version = version + 1, "
                       "updated_at = ? WHERE id = ?", (title, body, time.time(), note_id))
            db.execute("COMMIT")
        except Conflict:
            raise
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return self.get(note_id)

    def delete(self, note_id: int) -> bool:
        cur = self._db().execute("DELETE FROM notes WHERE id = ?", (note_id,))
        return cur.rowcount > 0
