"""One app's pool: the supervisor-side handle (`Pool`) and the child's entry point.

Each pool is a server's main process (a gunicorn arbiter or granian's, see
`hostsvc.engines`) in a child process of its own, started as a fresh interpreter
(`python -P -m hostsvc.pool run NAME`): a server installs signal handlers and may end
with sys.exit(), and a fresh interpreter keeps one app's imports, environment and
sys.path away from the supervisor and from other apps.

Readiness: the supervisor passes the write end of a pipe; the first worker to finish
booting writes one byte. EOF without that byte means the pool died while starting (for
example an import error: apps are built in the main process, so they fail early).

Orphans: the main process asks the kernel for SIGTERM when the supervisor dies
(PR_SET_PDEATHSIG), and each worker for SIGTERM when the main process dies.
"""
from __future__ import annotations

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
from .procs import children_of, set_parent_death_signal

SPEC_ENV = "HOSTSVC_POOL_SPEC"


CHECK_MARK = "hostsvc-check-result "


def _check_imports(spec: dict[str, Any]) -> None:
    """Build every app of `spec["apps"]` (they share env and python_path), reporting each
    outcome on stdout behind CHECK_MARK, so one interpreter checks a whole group."""
    from .loader import LoadError, build_app

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
    from .engines import serve

    serve(spec)


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
    """One running (or starting) pool main process for one app, on one socket path.

    A replaced app gets a new Pool on a new socket path (blue/green); a crashed pool is
    restarted as a new Pool on the same path, which is safe because its main process is gone.
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
        """The main process's pid (also after it exited), None before start()."""
        return self.proc.pid if self.proc else None

    def start(self, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start the main process; readiness arrives later on `ready_fd` (see poll_ready)."""
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
        """The main process's exit status once it has exited (reaping it), else None."""
        return self.proc.poll() if self.proc else 0

    def alive(self) -> bool:
        """Whether the main process still runs (reaps it if not)."""
        return self.exit_code() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the main process if it still runs."""
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """Graceful stop: the server closes and unlinks its socket, then drains workers."""
        self._close_ready()
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """Last resort after the grace period, or after the main process died: it and
        every worker left. The main process leads its own process group, so workers
        orphaned by its death (no longer its children) are still found and killed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def worker_pids(self) -> list[int]:
        """Pids of the pool's worker processes, from /proc (children of its main process)."""
        return children_of(self.pid) if self.pid and self.alive() else []


if __name__ == "__main__":
    main()
