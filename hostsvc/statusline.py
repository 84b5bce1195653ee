"""Which apps leave their status line in the environ, for hostsvc's request metrics.

An app that stores each response's status line under `environ[app.status_environ_key]`
before calling start_response spares a middleware that wants the status (the metrics'
`instrument()`) a wrapped start_response, a function created per request. hostsvc.web's
Application does, and so does hostsvc's mount (`loader.PrefixMiddleware`) around one.

The attribute is a promise about the code of `__call__`, so it is believed only where
the class that defines the `__call__` in use declares it too. A subclass that overrides
`__call__` (answering some paths itself, or rewriting the status), or a wrapper that
forwards attributes with `__getattr__`, inherits or passes on the attribute but not the
promise: its requests would be counted under a missing or wrong status.
"""
from __future__ import annotations


def status_environ_key(app: object) -> str | None:
    """The environ key under which `app` leaves its status line, or None if it does not
    promise to (wrap its start_response instead)."""
    for cls in type(app).__mro__:
        if "__call__" in cls.__dict__:
            if "status_environ_key" not in cls.__dict__:
                return None
            key = getattr(app, "status_environ_key", None)
            return key if isinstance(key, str) and key else None
    return None
