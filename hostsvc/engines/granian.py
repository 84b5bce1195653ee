"""The granian engine: granian's WSGI server (HTTP in Rust) for apps that need the speed.

How hostsvc's settings map to granian's (`options`):

| hostsvc            | granian                                                        |
|--------------------|----------------------------------------------------------------|
| workers            | workers (processes)                                            |
| threads            | blocking_threads: Python threads per worker that run the app   |
| graceful_timeout   | workers_kill_timeout                                           |
| worker_lifetime    | workers_lifetime (granian only; gunicorn has max_requests)     |
| timeout            | nginx's proxy timeouts only: granian cannot abort a request    |

keepalive and max_requests are gunicorn's only (the config refuses them here).

Embedding: the app is built in the main process before any worker is forked (as
gunicorn's preload_app), so an import error ends the pool before it is ready, and each
worker gets it through granian's `target_loader`, which also sets the parent-death
signal and reports readiness. Two private parts of granian are relied on, both checked
at start-up and pinned by the granian version range in pyproject.toml: the per-worker
watcher, replaced (`_server_class`), and the function that builds the WSGI environ's
base, wrapped so the process environment stays out (`_environ_without_process_env`).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from ..config import AppConfig
from ..procs import set_parent_death_signal
from . import pool_app, ready_signal

log = logging.getLogger("hostsvc.engines.granian")


def options(app: AppConfig, socket_path: str) -> dict[str, Any]:
    """granian server settings for one pool: WSGI over HTTP/1.1 on a private unix socket."""
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels

    return {
        "target": app.target,
        "uds": Path(socket_path),
        "uds_permissions": 0o600,
        "interface": Interfaces.WSGI,
        "http": HTTPModes.http1,
        "websockets": False,
        "workers": app.workers,
        "blocking_threads": app.threads,
        # As gunicorn's: a burst larger than granian's default 1024 queues, not fails.
        "backlog": 2048,
        "workers_kill_timeout": max(1, math.ceil(app.graceful_timeout)),
        "workers_lifetime": app.worker_lifetime or None,
        # A crashed worker is replaced; a worker that crashes again within 5.5 s ends
        # the pool, and the supervisor restarts it with backoff.
        "respawn_failed_workers": True,
        "log_level": LogLevels.warning,
        "log_dictconfig": _log_config(app.name),
        "log_access": False,    # nginx writes the access log
    }


def _log_config(app_name: str) -> dict[str, Any]:
    """granian's log on stderr, as gunicorn's: stdout carries nginx's access log, which
    tools parse line by line. Lines say which app's pool they come from."""
    fmt = f"[%(asctime)s] [%(process)d] [%(levelname)s] granian app={app_name}: %(message)s"
    return {
        "formatters": {"generic": {"()": "logging.Formatter", "fmt": fmt,
                                   "datefmt": "%Y-%m-%d %H:%M:%S %z"}},
        "handlers": {"console": {"formatter": "generic", "class": "logging.StreamHandler",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {"_granian": {"handlers": ["console"], "propagate": False}},
    }


def serve(spec: dict[str, Any]) -> None:
    """Run granian's main process until SIGTERM (then it stops the workers and returns)."""
    app = AppConfig(**spec["app"])
    metrics_on = bool(spec.get("metrics"))
    main_pid = os.getpid()
    ready = ready_signal(spec["ready_fd"])
    on_exit = _exit_recorder(app.name) if metrics_on else None
    os.umask(0o077)             # the socket and files the app writes: the service's user only
    wsgi = pool_app(app, metrics_on)

    def load(target: str) -> Callable[..., Any]:
        """In each worker, after the fork: die with the main process, then serve."""
        set_parent_death_signal(signal.SIGTERM, main_pid)
        ready()
        return wsgi

    # A pool restarted after a crash reuses its socket path; the dead one left the file.
    Path(spec["socket"]).unlink(missing_ok=True)
    server_class = _server_class(on_exit)       # checks the private parts it relies on
    _environ_without_process_env()
    server_class(**options(app, spec["socket"])).serve(target_loader=load)


def _server_class(on_exit: Callable[[int, str], None] | None) -> type:
    """granian's multiprocess server with hostsvc's watcher on every worker.

    granian watches each worker from a thread that joins (reaps) it, while its main
    thread also joins workers it stops; the two waitpid() calls race, and the loser
    logs "Killing worker after it refused to gracefully stop" for a worker that had
    stopped, on most reloads. Our watcher waits for the worker's exit without reaping
    it (waitid with WNOWAIT: not the sentinel pipe, which a process the worker forked
    keeps open after the worker died), leaving the reaping to the main thread, and does
    what granian's does on a crash (log, mark it for respawn, wake the main loop). It
    also records each exit (`on_exit`). All of that runs under a lock shared with forks:
    it takes locks (prometheus_client's, an import, the archive's flock, stderr's
    buffer) that a fork in the middle would copy into the new worker held forever.
    """
    from granian.log import logger as granian_log
    from granian.server.mp import MPServer

    fork_lock = threading.Lock()

    class Server(MPServer):
        stopping = False            # set once granian shuts down (signal or crash loop)

        def _spawn_worker(self, idx: int, target: Any, callback_loader: Any) -> Any:
            worker = super()._spawn_worker(idx, target, callback_loader)
            start = worker.start

            def locked_start() -> None:
                with fork_lock:
                    start()

            worker.start = locked_start
            worker._watcher = lambda: self._watch_worker(worker)
            return worker

        def shutdown(self, exit_code: int = 0) -> None:
            self.stopping = True
            super().shutdown(exit_code)

        def _watch_worker(self, worker: Any) -> None:
            try:
                os.waitid(os.P_PID, worker.inner.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass                                # already reaped by the main thread
            with fork_lock:
                if worker.interrupt_by_parent:      # stopped by granian
                    cause = "shutdown" if self.stopping or self.interrupt_signal \
                        else "lifetime"
                else:
                    cause = "crash"
                    granian_log.error("Unexpected exit from worker-%d", worker.idx + 1)
                    self.interrupt_children.append(worker.idx)
                    self.main_loop_interrupt.set()
                if on_exit is not None:
                    on_exit(worker.inner.pid, cause)

    import granian.server.mp as granian_mp
    from granian.server.common import AbstractWorker

    missing = [name for name in ("interrupt_children", "main_loop_interrupt", "interrupt_signal")
               if name not in MPServer.__init__.__code__.co_names]
    missing += [name for name in ("_watcher", "_watch") if not hasattr(AbstractWorker, name)]
    missing += [name for name in ("_wsgi_call_wrap",) if not hasattr(granian_mp, name)]
    if missing:
        raise RuntimeError(f"this granian has no {', '.join(missing)}; install the version "
                           "range hostsvc supports (pip install 'hostsvc[granian]')")
    return Server


def _environ_without_process_env() -> None:
    """Keep the process environment out of every WSGI environ.

    granian starts each request's environ from a copy of os.environ (CGI style). That
    hands every secret in the pool's env to anything that logs or dumps an environ,
    costs a dict copy per request, and turns a variable such as HTTP_PROXY into a
    request header the client never sent (hostsvc.web's request.headers shows "Proxy").
    gunicorn's environ has none of it. granian builds that base once per worker, in
    the function patched here, so it is built while os.environ is empty.
    """
    import granian.server.mp as mp

    build = mp._wsgi_call_wrap

    def wrap(*args: Any, **kwargs: Any) -> Any:
        saved = dict(os.environ)
        os.environ.clear()
        try:
            return build(*args, **kwargs)
        finally:
            os.environ.update(saved)

    mp._wsgi_call_wrap = wrap


def _exit_recorder(app_name: str) -> Callable[[int, str], None]:
    """worker_exited() for this app, its failures logged rather than raised."""
    from ..metrics import worker_exited

    def record(pid: int, cause: str) -> None:
        try:
            worker_exited(app_name, pid, cause)
        except Exception:  # noqa: BLE001 - a metrics failure must not stop the watcher
            log.exception("recording the exit of worker %s failed", pid)
    return record
