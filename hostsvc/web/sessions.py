"""Sessions: `tools.sessions` and the dict-like `web.session`, with three backends.

    config = {"/": {"tools.sessions.on": True,
                    "tools.sessions.storage_type": "file",       # or "cookie", "redis"
                    "tools.sessions.storage_path": "/var/lib/app/sessions",
                    "tools.sessions.timeout": 60}}                # minutes

    web.session["user"] = "ann"
    web.session.regenerate()      # on login: a new id, same data (stops session fixation)
    web.session.delete()          # on logout: data gone, cookie expired

Backends (`storage_type`, or `storage_class` for a `Store` subclass of your own):

- "cookie" (default): the whole session travels in the cookie as JSON with its expiry,
  signed with HMAC-SHA256 under `secret` (or the HOSTSVC_SESSION_SECRET environment
  variable). Nothing is stored on the server, so it works across hosts and processes
  with no setup. The prices: the ~4 KB cookie limit; the content is signed, not
  encrypted, so the user can read (not change) it: keep secrets out; and a copied cookie
  stays valid until it expires (a logout cannot revoke copies of it). Tampered or
  expired cookies give a fresh, empty session. The cookie is re-signed on every
  response that has a session, to slide its expiry.
- "file": one JSON file per session under `storage_path`, written atomically; for one
  host. Expired files are removed every `clean_freq` minutes after a response is sent.
- "redis": one key per session with a TTL, at `url` (redis://host:6379/0); for many
  hosts. Needs the `redis` package.

Values must be JSON-serialisable (tuples come back as lists) and keys must be strings:
JSON rather than pickle because session files and Redis keys are only as trustworthy as
whoever else can write to them, and unpickling is code execution.

Sessions load lazily, on first use, so requests that never touch `web.session` cost no
I/O beyond refreshing the expiry. A session is written only when its content changed
(compared as JSON, so `web.session["cart"].append(x)` counts), or on `regenerate()`;
otherwise its expiry is refreshed (sliding expiry). A new session that stays empty is
never stored and sets no cookie. Like CherryPy, the save runs at before_finalize, which
runs after a raised HTTPError or HTTPRedirect too, so those save; a request that fails
with an unexpected exception (500) does not, so half-done changes are not kept.

Concurrent requests of one session (two tabs, parallel XHRs, two gunicorn workers):

- file and redis with `locking` "implicit" (the default) take a per-session lock when
  the session is first loaded and hold it until the request's response is built, so
  such requests run one after the other and no update is lost. "early" takes the lock
  before the handler whether or not it uses the session; "explicit" only when the
  handler calls `web.session.acquire_lock()`; "none" never. Waiting longer than
  `lock_timeout` seconds (default 30) for a lock is a 503. A Redis lock expires after
  `lock_expire` seconds (default 120) so a crashed host cannot wedge a session; a request
  slower than that loses its lock and a warning is logged. (A file lock dies with its
  process, so it needs no expiry.)
- without locking (cookie always; file/redis with "none" or "explicit" unused) each
  request works on its own copy and the last one to save wins for the whole session:
  the other's changes are lost, not merged.

Session ids are `secrets.token_urlsafe(32)`. An id the client sends that is malformed,
unknown or expired is never adopted: the session gets a new id, so an attacker cannot
plant a known id in a victim's browser and wait for them to log in.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Iterator, MutableMapping
from email.utils import formatdate
from typing import Any

from .context import serving
from .errors import HTTPError
from .tools import HookMap, Tool

log = logging.getLogger("hostsvc.web")

SECRET_ENV = "HOSTSVC_SESSION_SECRET"
MIN_SECRET_LENGTH = 32
# Browsers keep at least 4096 bytes per cookie, counting name, value and attributes.
MAX_COOKIE_BYTES = 4096
LOCKING_MODES = ("implicit", "early", "explicit", "none")

_ID_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def new_id() -> str:
    """256 bits from the OS's CSPRNG, so ids cannot be guessed; URL- and cookie-safe."""
    return secrets.token_urlsafe(32)


def _dumps(data: dict[str, Any]) -> str:
    try:
        return json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"session values must be JSON-serialisable: {exc}") from None


class SessionTooLarge(ValueError):
    """The signed session cookie would exceed what browsers store."""


# -- stores ------------------------------------------------------------------------------
class Store:
    """Where sessions live. Subclasses implement load/save/touch/delete and locking.

    A store is shared by all threads of a process (one per distinct configuration), so
    its methods must be thread-safe. `token` is what the session cookie holds; for stores
    that keep data server-side it is the session id itself, and only tokens shaped like
    `new_id()` ones reach them, so a store may use ids in file names or keys as they are.
    """

    stateless = False

    def __init__(self, timeout: float = 60) -> None:
        if not timeout or float(timeout) <= 0:
            raise ValueError(f"tools.sessions.timeout must be a positive number of minutes, "
                             f"got {timeout!r}")
        self.timeout = float(timeout) * 60

    def load(self, token: str) -> tuple[str, dict[str, Any]] | None:
        """(id, data) of the live session `token` names, or None."""
        raise NotImplementedError

    def save(self, sid: str, payload: str) -> str:
        """Store JSON `payload` for `sid` with a fresh expiry; return the cookie value."""
        raise NotImplementedError

    def touch(self, token: str) -> bool:
        """Push back the expiry of a live session without reading it; False if gone.

        Never called for stateless stores: their expiry is inside the signed value, so
        refreshing it means saving the data again.
        """
        raise NotImplementedError

    def delete(self, sid: str) -> None:
        """Remove `sid`'s data; already gone is fine (two tabs logging out at once)."""
        raise NotImplementedError

    def acquire(self, sid: str) -> Any:
        """Block until this request holds `sid`'s lock; returns a handle for `release`."""
        return None

    def release(self, handle: Any) -> None:
        pass

    def after_request(self) -> None:
        """Housekeeping run after the response is sent (expired-session cleanup)."""


class CookieStore(Store):
    """Sessions kept entirely in a signed cookie (see the module docstring)."""

    stateless = True

    def __init__(self, secret: str | None = None, timeout: float = 60) -> None:
        super().__init__(timeout)
        secret = secret or os.environ.get(SECRET_ENV)
        if not secret:
            raise ValueError(
                f"cookie sessions need a signing secret: set tools.sessions.secret or the "
                f"{SECRET_ENV} environment variable to a random string of at least "
                f"{MIN_SECRET_LENGTH} characters (python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))'), the same on every host")
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"the session secret must be at least {MIN_SECRET_LENGTH} "
                             f"characters long, got {len(secret)}")
        # A key for this purpose only, so the secret can be reused for other signatures.
        self._key = hmac.new(secret.encode("utf-8"), b"hostsvc.web.sessions.cookie",
                             hashlib.sha256).digest()

    def _sign(self, body: bytes) -> bytes:
        return urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).rstrip(b"=")

    def load(self, token: str) -> tuple[str, dict[str, Any]] | None:
        body, sep, sig = token.encode("ascii", "replace").partition(b".")
        if not sep or not hmac.compare_digest(self._sign(body), sig):
            return None
        try:
            record = json.loads(urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
            sid, expires, data = record["i"], record["e"], record["d"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(sid, str) \
                or not isinstance(expires, (int, float)) or expires < time.time():
            return None
        return sid, data

    def save(self, sid: str, payload: str) -> str:
        record = '{"d":%s,"e":%.3f,"i":%s}' % (payload, time.time() + self.timeout,
                                             json.dumps(sid))
        body = urlsafe_b64encode(record.encode("utf-8")).rstrip(b"=")
        return (body + b"." + self._sign(body)).decode("ascii")

    def delete(self, sid: str) -> None:
        """Nothing to delete server-side; expiring the cookie is all a logout can do."""


class FileStore(Store):
    """One JSON file per session in `storage_path`; the file's mtime is its last use.

    Writes go to a temporary file renamed over the old one, so a reader sees the old or
    the new session, never half of one. Locks are flock()s on a `.lock` file beside each
    session, which serialise threads of one process and processes of one host alike.
    """

    PREFIX = "session-"
    TMP_PREFIX = ".tmp-"

    def __init__(self, storage_path: str | None = None, timeout: float = 60,
                 lock_timeout: float = 30, clean_freq: float = 5) -> None:
        super().__init__(timeout)
        if not storage_path:
            raise ValueError("file sessions need tools.sessions.storage_path: a directory "
                             "only this application writes to")
        self.path = os.path.abspath(storage_path)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.lock_timeout = float(lock_timeout)
        self.clean_interval = float(clean_freq) * 60
        self._next_clean = 0.0
        self._clean_guard = threading.Lock()

    def _file(self, sid: str) -> str:
        return os.path.join(self.path, self.PREFIX + sid)

    def _live(self, path: str) -> bool:
        try:
            return os.stat(path).st_mtime + self.timeout >= time.time()
        except FileNotFoundError:
            return False

    def load(self, token: str) -> tuple[str, dict[str, Any]] | None:
        path = self._file(token)
        if not self._live(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("unreadable session file %s; starting a new session", path)
            return None
        return (token, data) if isinstance(data, dict) else None

    def save(self, sid: str, payload: str) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=self.TMP_PREFIX)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
            os.replace(tmp, self._file(sid))
        except BaseException:
            _unlink(tmp)
            raise
        return sid

    def touch(self, token: str) -> bool:
        path = self._file(token)
        if not self._live(path):
            return False
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def delete(self, sid: str) -> None:
        _unlink(self._file(sid))

    def acquire(self, sid: str) -> tuple[int, str]:
        path = self._file(sid) + ".lock"
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if _flock_until(fd, deadline, delay):
                # The cleaner may have unlinked the lock file while we waited on it; a
                # lock on an unlinked inode excludes nobody, so start over on the new one.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if same:
                    return fd, sid
            os.close(fd)
            if time.monotonic() >= deadline:
                raise HTTPError(503, "The session is busy with another request; "
                                     "try again.")

    def release(self, handle: tuple[int, str]) -> None:
        fd, sid = handle
        try:
            if not os.path.exists(self._file(sid)):
                # Ids are never reused, so a lock whose session is gone (deleted, or an
                # unknown id a client sent) is never needed again: remove it while we
                # hold it, so clients sending random ids leave no files behind. Anyone
                # waiting on it notices the unlink and retries on a fresh file.
                _unlink(self._file(sid) + ".lock")
        finally:
            os.close(fd)  # closing the descriptor drops its flock

    def after_request(self) -> None:
        now = time.time()
        if now < self._next_clean or not self._clean_guard.acquire(blocking=False):
            return
        try:
            self._next_clean = now + self.clean_interval
            self.clean()
        finally:
            self._clean_guard.release()

    def clean(self) -> None:
        """Remove expired sessions, their lock files, and writes a crash left behind.

        Each session is removed under its own lock, taken without waiting: a session in
        use by a request is not expired, whatever its mtime says, and is left for the
        next pass.
        """
        cutoff = time.time() - self.timeout
        with os.scandir(self.path) as entries:
            names = []
            for entry in entries:
                if entry.name.startswith(self.PREFIX):
                    names.append(entry.name)
                elif entry.name.startswith(self.TMP_PREFIX) and \
                        entry.stat().st_mtime < cutoff:
                    _unlink(entry.path)
        sids = {n[len(self.PREFIX):].removesuffix(".lock") for n in names}
        for sid in sids:
            path = self._file(sid)
            try:
                if os.stat(path).st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                pass
            lock_path = path + ".lock"
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:
                _unlink(path)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                if not self._live(path):
                    _unlink(path)
                    _unlink(lock_path)
            finally:
                os.close(fd)


def _flock_until(fd: int, deadline: float, delay: float) -> bool:
    """Poll for an exclusive flock until `deadline`: a blocking flock cannot time out,
    and a request stuck forever behind a hung one is worse than a 503."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class RedisStore(Store):
    """One Redis key per session whose TTL is the session's expiry."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", timeout: float = 60,
                 lock_timeout: float = 30, lock_expire: float = 120,
                 key_prefix: str = "hostsvc:session:") -> None:
        super().__init__(timeout)
        try:
            import redis
        except ImportError:
            raise ImportError("tools.sessions.storage_type 'redis' needs the redis client: "
                              "pip install 'hostsvc[redis]' (or pip install redis)") from None
        self._client = redis.Redis.from_url(url)
        self._lock_errors = (redis.exceptions.LockError,)
        self.lock_timeout = float(lock_timeout)
        self.lock_expire = float(lock_expire)
        self.prefix = key_prefix
        self._ttl_ms = int(self.timeout * 1000)

    def load(self, token: str) -> tuple[str, dict[str, Any]] | None:
        raw = self._client.get(self.prefix + token)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            log.warning("unreadable session %s in Redis; starting a new session", token[:8])
            return None
        return (token, data) if isinstance(data, dict) else None

    def save(self, sid: str, payload: str) -> str:
        self._client.set(self.prefix + sid, payload, px=self._ttl_ms)
        return sid

    def touch(self, token: str) -> bool:
        return bool(self._client.pexpire(self.prefix + token, self._ttl_ms))

    def delete(self, sid: str) -> None:
        self._client.delete(self.prefix + sid)

    def acquire(self, sid: str) -> Any:
        lock = self._client.lock(self.prefix + "lock:" + sid, timeout=self.lock_expire,
                                 blocking_timeout=self.lock_timeout)
        if not lock.acquire():
            raise HTTPError(503, "The session is busy with another request; try again.")
        return lock

    def release(self, handle: Any) -> None:
        try:
            handle.release()
        except self._lock_errors:
            log.warning("a session lock expired before the request released it; raise "
                        "tools.sessions.lock_expire above the slowest request")


STORAGE_TYPES: dict[str, type[Store]] = {
    "cookie": CookieStore, "file": FileStore, "redis": RedisStore,
}


# -- the session object ------------------------------------------------------------------
class Session(MutableMapping):
    """The dict-like `web.session` of one request (see the module docstring)."""

    def __init__(self, store: Store, token: str | None, locking: str) -> None:
        self.store = store
        self.locking = locking
        self._token = token
        self._id: str | None = None
        self._data: dict[str, Any] | None = None
        self._snapshot = "{}"
        self._existed = False
        self._regenerated = False
        self._stale: list[str] = []
        self._expire_cookie = False
        self._lock: Any = None
        self._lock_id: str | None = None
        self._finished = False

    # -- loading ---------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._data is not None

    @property
    def locked(self) -> bool:
        return self._lock_id is not None

    def _usable_token(self) -> str | None:
        token = self._token
        if not token:
            return None
        if self.store.stateless:
            return token if len(token) < MAX_COOKIE_BYTES else None
        return token if _ID_RE.fullmatch(token) else None

    def load(self) -> None:
        """Read the session now (normally done on first use)."""
        if self._finished:
            # The response (and its cookie) is already built: a streaming generator that
            # reaches for the session now could neither save it nor release its lock.
            raise RuntimeError("web.session was first used after the response was built "
                               "(inside a streamed body?): read it in the handler before "
                               "returning the generator")
        token = self._usable_token()
        record = None
        if token is not None:
            if self.locking == "implicit" or self.locking == "early":
                self._acquire(token)
            record = self.store.load(token)
        if record is None:
            self._release()
            self._id, self._data, self._existed = new_id(), {}, False
        else:
            self._id, self._data, self._existed = record[0], record[1], True
        self._snapshot = _dumps(self._data)

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self.load()
        return self._data  # type: ignore[return-value]

    @property
    def id(self) -> str:
        if self._data is None:
            self.load()
        return self._id  # type: ignore[return-value]

    # -- mapping ---------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"session keys must be strings, not {type(key).__name__}")
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        state = "not loaded" if self._data is None else f"{len(self._data)} keys"
        return f"<Session {self.store.__class__.__name__} {state}>"

    # -- life cycle ------------------------------------------------------------------
    def regenerate(self) -> None:
        """Give the session a new id, keeping its data.

        Call it when privileges change (login) so an id an attacker planted or saw
        before is worth nothing afterwards; the old id's stored data is deleted.
        """
        if self._data is None:
            self.load()
        if self._existed:
            self._stale.append(self._id)  # type: ignore[arg-type]
        self._id = new_id()
        self._existed = False
        self._regenerated = True
        self._snapshot = ""  # differs from any payload: save even if nothing else changes

    def delete(self) -> None:
        """End the session (logout): stored data deleted, cookie expired.

        Values set afterwards in the same request start a new session under a new id.
        """
        if self._data is None:
            token = self._usable_token()
            if token is not None and not self.store.stateless:
                self._stale.append(token)
        elif self._existed:
            self._stale.append(self._id)  # type: ignore[arg-type]
        self._id, self._data, self._snapshot = new_id(), {}, "{}"
        self._existed = self._regenerated = False
        self._expire_cookie = True

    def acquire_lock(self) -> None:
        """Lock the session (for `locking: explicit`), reloading it under the lock so a
        read-modify-write cannot interleave with another request's."""
        if self.store.stateless or self.locked:
            return
        if self._data is None:
            token = self._usable_token()
            if token is not None:
                self._acquire(token)
            self.load()
        elif self._existed:
            self._acquire(self._id)  # type: ignore[arg-type]
            record = self.store.load(self._id)  # type: ignore[arg-type]
            self._data = record[1] if record else {}
            self._snapshot = _dumps(self._data)

    def release_lock(self) -> None:
        """Let other requests of this session proceed (done at the end of the request)."""
        self._release()

    def _acquire(self, sid: str) -> None:
        if self.store.stateless or self._lock_id is not None:
            return
        self._lock = self.store.acquire(sid)
        self._lock_id = sid

    def _release(self) -> None:
        if self._lock_id is not None:
            lock, self._lock, self._lock_id = self._lock, None, None
            self.store.release(lock)

    def finish(self, settings: "CookieSettings") -> None:
        """Persist changes (or refresh the expiry) and set or expire the cookie; the
        sessions tool calls this at before_finalize."""
        self._finished = True
        store = self.store
        for sid in self._stale:
            store.delete(sid)
        self._stale.clear()
        if self._data is None and not store.stateless:
            token = self._usable_token()
            if token is not None and store.touch(token) and settings.persistent:
                settings.set_cookie(token, store.timeout)
            return
        data = self.data
        payload = _dumps(data)
        if payload != self._snapshot or (store.stateless and self._existed):
            if not data and not self._existed:
                if self._expire_cookie or self._regenerated:
                    settings.expire_cookie()
                return
            value = store.save(self._id, payload)  # type: ignore[arg-type]
            self._snapshot, self._existed = payload, True
            settings.set_cookie(value, store.timeout)
        elif self._existed:
            if store.touch(self._id) and settings.persistent:  # type: ignore[arg-type]
                settings.set_cookie(self._id, store.timeout)  # type: ignore[arg-type]
        elif self._expire_cookie:
            settings.expire_cookie()


class CookieSettings:
    """How the session cookie is written (name, scope and security flags)."""

    def __init__(self, name: str = "session_id", path: str = "/", domain: str | None = None,
                 secure: bool = False, httponly: bool = True, samesite: str | None = "Lax",
                 persistent: bool = True) -> None:
        if samesite is not None and str(samesite).lower() not in ("lax", "strict", "none"):
            raise ValueError(f"tools.sessions.samesite must be 'Lax', 'Strict', 'None' or "
                             f"null, not {samesite!r}")
        if samesite is not None and str(samesite).lower() == "none" and not secure:
            raise ValueError("tools.sessions.samesite 'None' needs tools.sessions.secure: "
                             "browsers drop SameSite=None cookies that are not Secure")
        self.name, self.path, self.domain = name, path, domain
        self.secure, self.httponly, self.persistent = secure, httponly, persistent
        self.samesite = str(samesite).capitalize() if samesite is not None else None

    def _morsel(self, value: str) -> Any:
        jar = serving.response.cookie
        jar[self.name] = value
        morsel = jar[self.name]
        morsel["path"] = self.path
        if self.domain:
            morsel["domain"] = self.domain
        if self.secure:
            morsel["secure"] = True
        if self.httponly:
            morsel["httponly"] = True
        if self.samesite:
            morsel["samesite"] = self.samesite
        return morsel

    def set_cookie(self, value: str, lifetime: float) -> None:
        morsel = self._morsel(value)
        if self.persistent:
            morsel["max-age"] = int(lifetime)
            morsel["expires"] = formatdate(time.time() + lifetime, usegmt=True)
        size = len(morsel.OutputString())
        if size > MAX_COOKIE_BYTES:
            del serving.response.cookie[self.name]
            raise SessionTooLarge(
                f"the session cookie would be {size} bytes, over the {MAX_COOKIE_BYTES} "
                f"browsers keep: store less in the session or use storage_type 'file' "
                f"or 'redis'")

    def expire_cookie(self) -> None:
        morsel = self._morsel("")
        morsel["max-age"] = 0
        morsel["expires"] = "Thu, 01 Jan 1970 00:00:00 GMT"


# -- the tool ----------------------------------------------------------------------------
_COOKIE_KEYS = ("name", "path", "domain", "secure", "httponly", "samesite", "persistent")
_stores: dict[tuple, Store] = {}
_stores_guard = threading.Lock()


def _store_for(storage_type: str, storage_class: type[Store] | None, args: dict[str, Any]
               ) -> Store:
    """One store per distinct configuration per process, so paths with the same settings
    share a Redis connection pool and a file cleaner."""
    cls = storage_class or STORAGE_TYPES.get(str(storage_type).lower())
    if cls is None:
        raise ValueError(f"unknown tools.sessions.storage_type {storage_type!r}; expected "
                         f"one of {', '.join(STORAGE_TYPES)}")
    key = (cls, tuple(sorted((k, repr(v)) for k, v in args.items())))
    with _stores_guard:
        store = _stores.get(key)
        if store is None:
            accepted = inspect.signature(cls).parameters
            unknown = sorted(set(args) - set(accepted))
            if unknown:
                raise ValueError(
                    f"tools.sessions.{unknown[0]} does not apply to {cls.__name__}; it takes "
                    f"{', '.join(list(accepted) + list(_COOKIE_KEYS))}, locking, storage_type")
            store = cls(**args)
            _stores[key] = store
    return store


def _start(store: Store, locking: str, name: str) -> None:
    req = serving.request
    req.session = Session(store, req.cookies.get(name), locking)
    if locking == "early":
        req.session.load()


def _finish(cookie: CookieSettings) -> None:
    session = serving.request.session
    if session is not None:
        session.finish(cookie)


def _release() -> None:
    session = serving.request.session
    if session is not None:
        session.release_lock()


def expire() -> None:
    """End the current session (CherryPy's `lib.sessions.expire()`)."""
    serving.request.session.delete()


class SessionTool(Tool):
    """`tools.sessions`: attaches loading, saving and lock release for its paths.

    The store is built when the config is first used, so a missing secret or
    storage_path fails that request with an error naming the setting, not silently.
    """

    def __init__(self) -> None:
        super().__init__("before_request_body", _start, priority=50)

    def attach(self, hooks: HookMap, kwargs: dict[str, Any]) -> None:
        args = dict(kwargs)
        priority = args.pop("priority", self._priority)
        locking = str(args.pop("locking", "implicit")).lower()
        if locking in ("false", "off", "no"):
            locking = "none"
        if locking not in LOCKING_MODES:
            raise ValueError(f"tools.sessions.locking must be one of "
                             f"{', '.join(LOCKING_MODES)}, not {locking!r}")
        cookie = CookieSettings(**{k: args.pop(k) for k in _COOKIE_KEYS if k in args})
        store = _store_for(args.pop("storage_type", "cookie"), args.pop("storage_class", None),
                           args)
        hooks.attach("before_request_body", _start, priority, store=store, locking=locking,
                     name=cookie.name)
        hooks.attach("before_finalize", _finish, priority, cookie=cookie)
        hooks.attach("on_end_resource", _release, priority)
        # Backstop: a lock taken while a streamed body was sent is released at its end.
        hooks.attach("on_end_request", _release, priority)
        if type(store).after_request is not Store.after_request:
            hooks.attach("on_end_request", store.after_request, priority)
