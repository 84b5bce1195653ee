"""The servers a pool can run an app on, one module each: `gunicorn` (the default) and
`granian`. Each has `serve(spec)`, run in the pool's child process, which blocks until
the server stops.

What every engine must do, so that the supervisor treats all pools alike:
- serve the app built by `pool_app()` on the unix socket `spec["socket"]`, its workers
  forked from the process the supervisor started (the pool's main process), after the
  app was built there, so an import error ends the pool before it is ready;
- write READY_BYTE to `spec["ready_fd"]` once a worker can serve (`ready_signal`);
- have every worker die with the main process (`set_parent_death_signal`), and the main
  process stop on SIGTERM: close the socket, let workers finish their requests within
  `graceful_timeout`, then exit;
- report each worker exit to the metrics (`hostsvc.metrics.worker_exited`) with its cause.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from ..config import AppConfig

READY_BYTE = b"R"


def serve(spec: dict[str, Any]) -> None:
    """Run the pool described by `spec` on the engine its app names."""
    engine = importlib.import_module(f"{__name__}.{spec['app']['engine']}")
    engine.serve(spec)


def pool_app(app: AppConfig, metrics: bool) -> Callable[..., Any]:
    """The app's WSGI callable as the pool serves it: mounted at its prefix and, with
    metrics on, instrumented (outside the prefix handling, so its 404s count too)."""
    from ..loader import build_app

    wsgi = build_app(app)
    if metrics and app.metrics:
        from ..metrics import instrument

        wsgi = instrument(app.name, wsgi)
    return wsgi


def ready_signal(fd: int) -> Callable[[], None]:
    """A callable for each booted worker: the first byte that reaches the supervisor
    tells it the pool serves; later ones find the pipe closed, which is fine."""
    def ready() -> None:
        try:
            os.write(fd, READY_BYTE)
        except OSError:
            pass
    return ready
