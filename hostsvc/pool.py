"""One app's gunicorn pool: the supervisor-side handle (`Pool`) and the child's entry point.

Each pool is a gunicorn arbiter in a child process of its own, started as a fresh
interpreter (`python -P -m hostsvc.pool run NAME`): an arbiter installs signal handlers and
ends with sys.exit(), and a fresh interpreter keeps one app's imports, environment and
sys.path away from the supervisor and from other apps.

Readiness: the supervisor passes the write end of a pipe; the first worker to finish
booting writes one byte. EOF without that byte means the pool died while starting (for
example an import error: apps are preloaded in the arbiter, so they fail early).

Orphans: the arbiter asks the kernel for SIGTERM when the supervisor dies
(PR_SET_PDEATHSIG), and each worker for SIGTERM when its arbiter dies; gunicorn workers
also check their parent pid on every loop.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import AppConfig

PR_SET_PDEATHSIG = 1
SPEC_ENV = "HOSTSVC_POOL_SPEC"
READY_BYTE = b"R"


def set_parent_death_signal(sig: int = signal.SIGTERM, expected_ppid: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux only).

    If the parent already died before this call (the fork/exec race), exit at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if expected_ppid is not None and os.getppid() != expected_ppid:
        os._exit(1)


class PrefixMiddleware:
    """Sets SCRIPT_NAME to the app's mount prefix and PATH_INFO to the rest.

    Chosen over a trusted SCRIPT_NAME header from nginx because the prefix is fixed per
    pool and known here: nothing depends on header trust, the app sees the same environ
    whether reached through nginx or straight through its socket (tests, probes), and a
    path outside the prefix is a clean 404 rather than gunicorn's ConfigurationProblem.
    """

    def __init__(self, app: Callable[..., Any], prefix: str) -> None:
        self.app = app
        self.prefix = "" if prefix == "/" else prefix

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        prefix = self.prefix
        if prefix:
            path = environ.get("PATH_INFO", "")
            if path == prefix or path.startswith(prefix + "/"):
                environ["SCRIPT_NAME"] = prefix
                environ["PATH_INFO"] = path[len(prefix):]
            elif not environ.get("SCRIPT_NAME"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"Not Found\n"]
        return self.app(environ, start_response)


def build_app(app: AppConfig) -> Callable[..., Any]:
    """The WSGI callable for `app`: an object tree wrapped in hostsvc.web, or the callable.

    Object trees get `tools.proxy.on: True` at "/" unless the config says otherwise, so
    `web.request.remote.ip` and `web.url()` describe the client behind nginx. `root:` may
    also name a ready `web.Application` (an app that ships its own per-path config, such
    as a MethodDispatcher section): the YAML `config:` is merged over its own.
    """
    from .loader import LoadError, import_string

    target = import_string(app.target, app.python_path)
    if app.kind == "root":
        from hostsvc import web

        config = {path: dict(section) for path, section in app.config.items()}
        script_name = "" if app.prefix == "/" else app.prefix
        if isinstance(target, web.Application):
            if "tools.proxy.on" not in target.config.get("/", {}):
                config.setdefault("/", {}).setdefault("tools.proxy.on", True)
            target.script_name = script_name
            target.merge(config)
            wsgi = target
        else:
            config.setdefault("/", {}).setdefault("tools.proxy.on", True)
            root = target() if isinstance(target, type) else target
            wsgi = web.Application(root, script_name, config)
    else:
        wsgi = target
        if not callable(wsgi):
            raise LoadError(f"{app.target} is a {type(wsgi).__name__}, not a WSGI callable")
    return PrefixMiddleware(wsgi, app.prefix)


def gunicorn_options(app: AppConfig, socket_path: str) -> dict[str, Any]:
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


# -- the child -----------------------------------------------------------------------------
def _run_arbiter(spec: dict[str, Any]) -> None:
    from gunicorn.app.base import BaseApplication

    app = AppConfig(**spec["app"])
    ready_fd: int = spec["ready_fd"]
    # The supervisor's metrics: worker restart causes and dead-worker archiving (hooks),
    # request metrics (instrument()) unless the config turned them off for this app.
    metrics_on = bool(spec.get("metrics"))
    arbiter_pid = os.getpid()

    def post_fork(server: Any, worker: Any) -> None:
        """In each new worker: die with the arbiter, even if it is SIGKILLed."""
        set_parent_death_signal(signal.SIGTERM, arbiter_pid)

    def post_worker_init(worker: Any) -> None:
        """In each worker once booted: the first such byte tells the supervisor "ready"."""
        try:
            os.write(ready_fd, READY_BYTE)
        except OSError:
            pass   # the supervisor already read the first worker's byte and closed its end

    class HostsvcApplication(BaseApplication):
        """gunicorn's embedding API: settings from the app's config, no command line."""

        def load_config(self) -> None:
            for key, value in gunicorn_options(app, spec["socket"]).items():
                self.cfg.set(key, value)
            self.cfg.set("post_fork", post_fork)
            self.cfg.set("post_worker_init", post_worker_init)
            if metrics_on:
                from .metrics import gunicorn_hooks

                for key, value in gunicorn_hooks(app.name).items():
                    self.cfg.set(key, value)

        def load(self) -> Callable[..., Any]:
            wsgi = build_app(app)
            if metrics_on and app.metrics:
                from .metrics import instrument

                # Outside PrefixMiddleware, so its 404s for paths outside the prefix count.
                wsgi = instrument(app.name, wsgi)
            return wsgi

    HostsvcApplication().run()


CHECK_MARK = "hostsvc-check-result "


def _check_imports(spec: dict[str, Any]) -> None:
    """Build every app of `spec["apps"]` (they share env and python_path), reporting each
    outcome on stdout behind CHECK_MARK, so one interpreter checks a whole group."""
    from .loader import LoadError

    for app in spec["apps"]:
        os.environ["HOSTSVC_APP"] = app["name"]
        os.environ["HOSTSVC_PREFIX"] = app["prefix"]
        error = None
        try:
            build_app(AppConfig(**app))
        except LoadError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - building the app ran user code
            error = f"building the app failed: {type(exc).__name__}: {exc}"
        print(CHECK_MARK + json.dumps({"name": app["name"], "error": error}), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Child entry point: `python -P -m hostsvc.pool run|check NAME`, the spec (JSON) in
    $HOSTSVC_POOL_SPEC so that `ps` shows a readable command line."""
    argv = sys.argv[1:] if argv is None else argv
    mode, spec = argv[0], json.loads(os.environ.pop(SPEC_ENV))
    if mode == "check":
        os.environ.update(spec["apps"][0]["env"])
        _check_imports(spec)
        return
    set_parent_death_signal(signal.SIGTERM, spec["supervisor_pid"])
    app = spec["app"]
    os.environ.update(app["env"])
    os.environ["HOSTSVC_APP"] = app["name"]
    os.environ["HOSTSVC_PREFIX"] = app["prefix"]
    _run_arbiter(spec)


def _child(mode: str, spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Command line and environment for a pool child."""
    env = dict(os.environ, **{SPEC_ENV: json.dumps(spec)})
    names = spec["app"]["name"] if "app" in spec else ",".join(a["name"] for a in spec["apps"])
    return [sys.executable, "-P", "-m", "hostsvc.pool", mode, names], env


def check_apps(apps: Iterable[AppConfig], source: str, timeout: float = 60) -> list[str]:
    """Import every app the way its pool would, in throwaway processes, in parallel.

    Returns `FILE:LINE: apps[i].root: ...` errors. Throwaway processes because importing
    runs user code that must not touch the caller. Apps with the same env and python_path
    share one process (an interpreter start costs more than most imports, and start-up
    time matters); an app whose group process died before reporting it (user code that
    exits at import) is checked again alone, so its own error is the one reported.
    """
    apps = list(apps)
    groups: dict[str, list[AppConfig]] = {}
    for app in apps:
        groups.setdefault(json.dumps([app.env, app.python_path], sort_keys=True), []).append(app)

    def error_line(app: AppConfig, detail: str) -> str:
        return f"{source}:{app.target_line}: apps[{app.index}].{app.kind}: {detail}"

    def run_group(group: list[AppConfig]) -> dict[str, str | None]:
        """{app name: error or None} for the apps the process reported on."""
        cmd, env = _child("check", {"apps": [asdict(a) for a in group]})
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {a.name: f"importing {a.target} took longer than {timeout:.0f}s"
                    for a in group}
        results = {}
        for line in proc.stdout.splitlines():
            if line.startswith(CHECK_MARK):
                result = json.loads(line[len(CHECK_MARK):])
                results[result["name"]] = result["error"]
        if len(group) == 1 and group[0].name not in results:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            results[group[0].name] = lines[-1] if lines else (
                f"importing {group[0].target} ended the process (exit status {proc.returncode})")
        return results

    def check_group(group: list[AppConfig]) -> list[tuple[int, str]]:
        results = run_group(group)
        errors = []
        for app in group:
            if app.name not in results:  # the process died before this app: alone, then
                results.update(run_group([app]))
            if results[app.name] is not None:
                errors.append((app.index, error_line(app, results[app.name])))  # type: ignore[arg-type]
        return errors

    if not apps:
        return []
    with ThreadPoolExecutor(max_workers=min(4, len(groups))) as ex:
        found = [e for errs in ex.map(check_group, groups.values()) for e in errs]
    return [line for _, line in sorted(found)]


# -- the supervisor's handle ----------------------------------------------------------------
class Pool:
    """One running (or starting) arbiter for one app, on one socket path.

    A replaced app gets a new Pool on a new socket path (blue/green); a crashed pool is
    restarted as a new Pool on the same path, which is safe because its arbiter is gone.
    """

    def __init__(self, app: AppConfig, socket_path: str, metrics: bool = False) -> None:
        self.app = app
        self.socket_path = socket_path
        self.metrics = metrics        # the supervisor runs metrics (PROMETHEUS_MULTIPROC_DIR)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_fd: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.ready_at = 0.0

    @property
    def pid(self) -> int | None:
        """The arbiter's pid (also after it exited), None before start()."""
        return self.proc.pid if self.proc else None

    def start(self, preexec_fn: Callable[[], None] | None = None) -> None:
        """Fork the arbiter; readiness arrives later on `ready_fd` (see poll_ready)."""
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        spec = {"app": asdict(self.app), "socket": self.socket_path, "ready_fd": wfd,
                "supervisor_pid": os.getpid(), "metrics": self.metrics}
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            cmd, env = _child("run", spec)
            self.proc = subprocess.Popen(cmd, pass_fds=(wfd,), env=env,
                                         stdin=subprocess.DEVNULL, preexec_fn=preexec_fn,
                                         process_group=0)
        finally:
            os.close(wfd)
        self.ready_fd = rfd
        self.started_at = time.time()

    def poll_ready(self) -> bool | None:
        """True once a worker has booted, False if the pool died first, None while waiting."""
        if self.ready:
            return True
        if self.ready_fd is None:
            return False
        try:
            data = os.read(self.ready_fd, 64)
        except BlockingIOError:
            return None
        self._close_ready()
        if data:
            self.ready = True
            self.ready_at = time.time()
            return True
        return False

    def _close_ready(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    def exit_code(self) -> int | None:
        """The arbiter's exit status once it has exited (reaping it), else None."""
        return self.proc.poll() if self.proc else 0

    def alive(self) -> bool:
        """Whether the arbiter still runs (reaps it if not)."""
        return self.exit_code() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the arbiter if it still runs."""
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """Graceful stop: gunicorn closes and unlinks its socket, then drains workers."""
        self._close_ready()
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """Last resort after the grace period, or after the arbiter died: the arbiter and
        every worker left. The arbiter leads its own process group, so workers orphaned
        by a dead arbiter (no longer its children) are still found and killed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def worker_pids(self) -> list[int]:
        """Pids of the arbiter's worker processes, from /proc (children of the arbiter)."""
        return children_of(self.pid) if self.pid and self.alive() else []


def children_of(ppid: int, zombies: bool = False) -> list[int]:
    """Live pids whose parent is `ppid` (or only its unreaped zombies), from /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may hold spaces and parens.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == ppid and (fields[0] == b"Z") == zombies:
            found.append(int(entry))
    return sorted(found)


if __name__ == "__main__":
    main()
