"""Per-thread request state, and the module-level proxies `request`, `response`, `session`.

gthread workers serve several requests at once in one process, so the objects a handler
reaches through `web.request` must belong to the thread serving it. A thread-local holds
them; the proxies forward attribute access to whatever the current thread is serving.
"""
from __future__ import annotations

import threading
from typing import Any


class _Serving(threading.local):
    request: Any = None
    response: Any = None


serving = _Serving()


class _Proxy:
    """Forwards attribute access to `serving.<name>` of the current thread."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _target(self) -> Any:
        obj = getattr(serving, self._name)
        if obj is None:
            raise AttributeError(f"web.{self._name} is only available while a request is served")
        return obj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._target(), name)

    def __repr__(self) -> str:
        return f"<web.{self._name} proxy to {getattr(serving, self._name)!r}>"


class _SessionProxy:
    """`web.session`: the session of the current request, set up by the sessions tool."""

    __slots__ = ()

    def _target(self) -> Any:
        req = serving.request
        sess = getattr(req, "session", None) if req is not None else None
        if sess is None:
            raise AttributeError("web.session needs tools.sessions.on for this path")
        return sess

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def __getitem__(self, key: str) -> Any:
        return self._target()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._target()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._target()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._target()

    def __iter__(self):
        return iter(self._target())

    def __len__(self) -> int:
        return len(self._target())


request = _Proxy("request")
response = _Proxy("response")
session = _SessionProxy()
