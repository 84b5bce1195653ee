"""The gunicorn engine: one arbiter per app, sync or gthread workers, preloaded app.

Settings map one to one (`options`); gunicorn's own server hooks carry readiness, the
parent-death signal and the worker-exit causes for the metrics.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable

from ..config import AppConfig
from ..procs import set_parent_death_signal
from . import pool_app, ready_signal


def options(app: AppConfig, socket_path: str) -> dict[str, Any]:
    """gunicorn settings for one pool: unix socket, sync or gthread, no control socket."""
    return {
        "bind": [f"unix:{socket_path}"],
        "workers": app.workers,
        "worker_class": "gthread" if app.threads > 1 else "sync",
        "threads": app.threads,
        "timeout": app.timeout,
        "graceful_timeout": app.graceful_timeout,
        # Longer than nginx's idle upstream keep-alive (60 s) so nginx closes first.
        "keepalive": app.keepalive,
        "max_requests": app.max_requests,
        "max_requests_jitter": app.max_requests_jitter,
        "preload_app": True,
        # Every arbiter of a user would share (and unlink) the default control socket.
        "control_socket_disable": True,
        # Sockets (and files the app writes) private to the service's user; nginx runs
        # as that user. gunicorn's default umask of 0 leaves sockets world-writable.
        "umask": 0o077,
        "proc_name": f"hostsvc-{app.name}",
        "errorlog": "-",
        "loglevel": "warning",
        "accesslog": None,   # nginx writes the access log
    }


def serve(spec: dict[str, Any]) -> None:
    """Run the arbiter until it is told to stop (gunicorn ends with sys.exit)."""
    from gunicorn.app.base import BaseApplication

    app = AppConfig(**spec["app"])
    metrics_on = bool(spec.get("metrics"))
    arbiter_pid = os.getpid()
    ready = ready_signal(spec["ready_fd"])

    def post_fork(server: Any, worker: Any) -> None:
        """In each new worker: die with the arbiter, even if it is SIGKILLed."""
        set_parent_death_signal(signal.SIGTERM, arbiter_pid)

    def post_worker_init(worker: Any) -> None:
        ready()

    class HostsvcApplication(BaseApplication):
        """gunicorn's embedding API: settings from the app's config, no command line."""

        def load_config(self) -> None:
            for key, value in options(app, spec["socket"]).items():
                self.cfg.set(key, value)
            self.cfg.set("post_fork", post_fork)
            self.cfg.set("post_worker_init", post_worker_init)
            if metrics_on:
                from ..metrics import gunicorn_hooks

                for key, value in gunicorn_hooks(app.name).items():
                    self.cfg.set(key, value)

        def load(self) -> Callable[..., Any]:
            return pool_app(app, metrics_on)

    HostsvcApplication().run()
