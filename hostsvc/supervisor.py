"""The supervisor: runs every app's pool and nginx, restarts what crashes, reloads, stops.

Read it top to bottom like gunicorn's arbiter.py:

    run()            set up the runtime dir and metrics server, start pools, start nginx,
                     loop, stop
    _loop()          wait for a signal or a tick; HUP reloads, TERM/INT stop;
                     each tick: pools that became ready or died, restarts due, nginx,
                     the watched config file, state.json
    reload()         validate the new file (a failure changes nothing), start added and
                     changed apps on NEW socket paths, wait until ready, point nginx at
                     them (nginx -t, reload), wait for old nginx workers to drain, then
                     TERM replaced and removed pools (blue/green, no dropped request)
    stop()           nginx stops accepting and drains (SIGQUIT), then every pool gets
                     TERM, then KILL after the grace period; exit 0

Everything runs on the main thread: children get PR_SET_PDEATHSIG, which fires when the
*thread* that forked them exits, and signal handlers only queue.

The local interface for other tools is RUNTIME/state.json (schema in docs/config.md),
rewritten atomically whenever something changes, and RUNTIME/hostsvc.pid. With metrics on
(docs/metrics.md), a MetricsServer thread serves /metrics, /healthz, /readyz and nginx's
upstream errors from a snapshot of that document, which the main thread replaces each
tick (the server threads never touch the live Pool objects).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import select
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from . import config as configmod
from .config import AppConfig, Config, ConfigError
from .pool import Pool, check_apps
from .procs import children_of, set_parent_death_signal
from .proxy import Nginx, NginxError, metrics_address, render

log = logging.getLogger("hostsvc")

STATE_VERSION = 1
START_TIMEOUT = 60.0          # seconds a pool may take to boot its first worker
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
STABLE_AFTER = 30.0           # a pool up this long resets its crash counter
CRASHLOOP_AFTER = 3           # consecutive failures before state says "crashloop"
TICK = 0.25
NGINX_AFTER = 5.0             # at start, nginx waits this long at most for slow pools
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
UNIX_PATH_MAX = 107           # sun_path is 108 bytes on Linux, with the final NUL


@dataclass
class AppState:
    """The supervisor's view of one app across restarts and replacements."""

    app: AppConfig
    socket_path: str
    pool: Pool | None = None
    state: str = "starting"       # starting | running | backoff | crashloop | stopping
    restarts: int = 0
    failures: int = 0             # consecutive failures, for the backoff
    restart_at: float = 0.0       # monotonic time of the next restart while in backoff
    last_error: str | None = None
    generation: int = 1
    worker_pids: list[int] = field(default_factory=list)


def _fmt(event: str, app: str | None = None, pid: int | None = None, **fields: Any) -> str:
    parts = ([f"app={app}"] if app else []) + ([f"pid={pid}"] if pid else []) + \
        [f"event={event}"] + [f"{k}={v}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class Supervisor:
    """Owns the runtime dir, the pools and nginx for one config file."""

    def __init__(self, config_path: str, runtime_dir: str | None = None,
                 watch: bool = False) -> None:
        self.config_path = config_path
        self.runtime_override = runtime_dir
        self.watch = watch
        self.cfg: Config | None = None
        self.runtime_dir = ""
        self.apps: dict[str, AppState] = {}
        self.draining: list[tuple[Pool, float]] = []     # old pools and their kill deadline
        self.nginx: Nginx | None = None
        self.nginx_restart_at = 0.0
        self.nginx_failures = 0
        self.nginx_workers: list[int] = []
        self.signals: list[int] = []
        self.wakeup_r = self.wakeup_w = -1
        self.started_at = time.time()
        self.pid = os.getpid()
        self.last_reload: dict[str, Any] | None = None
        self.reloads: dict[str, Any] = {"ok": 0, "failed": 0, "last_success": None}
        self.config_digest = ""
        self._last_state = ""
        self._next_scan = 0.0
        self._generations: dict[str, int] = {}
        self.metrics_server: Any = None      # hostsvc.metrics.MetricsServer when enabled
        self.status_port: int | None = None  # nginx's loopback stub_status server
        self.upstream_token = ""             # nginx's proof when it reports upstream errors
        self._state_snapshot: dict[str, Any] = {"started_at": self.started_at, "apps": {}}

    # -- run ------------------------------------------------------------------------------
    def run(self) -> int:
        """Start everything, supervise until TERM/INT, stop everything. The exit status."""
        try:
            self.cfg = self._load_config()
        except ConfigError:
            return 2
        self.config_digest = self._digest()
        self.runtime_dir = self.cfg.runtime_dir
        if not self._claim_runtime_dir():
            return 1
        # Every pool inherits it: apps (the status page) find state.json through it.
        os.environ["HOSTSVC_RUNTIME_DIR"] = os.path.abspath(self.runtime_dir)
        try:
            self._start_metrics()
            self._install_signals()
            if not self.start():
                self.stop()
                return 1
            self._loop()
            self.stop()
            return 0
        finally:
            self._stop_metrics()
            self._release_runtime_dir()

    def _start_metrics(self) -> None:
        """Metrics on: empty RUNTIME/metrics for the pools' multiprocess files and serve
        /healthz, /readyz and /metrics from now on (probes answer during start-up).

        A listener that cannot bind (a port in use) is logged as an error and the
        service runs without metrics, as with `metrics: off`: metrics never keep the
        apps from serving (Prometheus sees the target down)."""
        assert self.cfg is not None
        if not self.cfg.metrics.enabled:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)   # no pool writes files
            return
        from .metrics import MetricsServer, prepare_multiproc_dir

        prepare_multiproc_dir(os.path.join(self.runtime_dir, "metrics"))
        self.status_port = _free_loopback_port()
        self._state_snapshot = self._initial_snapshot()
        listen = self.cfg.metrics.listen
        assert listen is not None
        self.upstream_token = secrets.token_hex(16)
        server = MetricsServer(lambda: self._state_snapshot, listen=listen,
                               nginx_status_url=f"http://127.0.0.1:{self.status_port}"
                                                "/nginx_status",
                               upstream_token=self.upstream_token)
        try:
            server.start()
        except OSError as exc:
            log.error("metrics listener %s: %s; running WITHOUT metrics (set "
                      "metrics.listen, or metrics: off)", listen, exc.strerror or exc)
            self.status_port = None
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            return
        self.metrics_server = server
        log.info("metrics on http://%s/metrics (also /healthz, /readyz)",
                 metrics_address(listen))

    def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None

    def _initial_snapshot(self) -> dict[str, Any]:
        """Before the first state(): every configured app, starting."""
        assert self.cfg is not None
        return {"started_at": self.started_at, "reloads": dict(self.reloads),
                "apps": {a.name: {"prefix": a.prefix, "state": "starting", "pid": None,
                                  "workers": a.workers, "worker_pids": [], "restarts": 0}
                         for a in self.cfg.apps}}

    def _load_config(self) -> Config:
        """Load, validate and import-check the config file; log every error and raise."""
        try:
            cfg = configmod.load(self.config_path, self.runtime_override)
            errors = check_apps(cfg.apps, self.config_path)
            if errors:
                raise ConfigError(errors)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("%s", line)
            raise
        return cfg

    def _claim_runtime_dir(self) -> bool:
        rd = Path(self.runtime_dir)
        longest = max([len(a.name) for a in self.cfg.apps] or [0])
        if len(str(rd / "sockets")) + longest + 12 > UNIX_PATH_MAX:
            # bind() would fail with an obscure error in every pool: say it here.
            log.error("runtime dir %s is too long for unix socket paths (%d bytes max); "
                      "use a shorter runtime_dir or --runtime-dir", rd, UNIX_PATH_MAX)
            return False
        # Only this user (and nginx, running as it) may reach the pools' sockets: they
        # trust forwarded headers, so a local user connecting directly could spoof them.
        (rd / "sockets").mkdir(parents=True, exist_ok=True)
        os.chmod(rd / "sockets", 0o700)
        pidfile = rd / "hostsvc.pid"
        try:
            other = int(pidfile.read_text().strip())
            if other != os.getpid() and _pid_alive(other):
                log.error("another supervisor (pid %d) uses runtime dir %s", other, rd)
                return False
        except (OSError, ValueError):
            pass
        for stale in (rd / "sockets").glob("*.sock"):
            stale.unlink(missing_ok=True)
        _atomic_write(pidfile, f"{os.getpid()}\n")
        return True

    def _release_runtime_dir(self) -> None:
        Path(self.runtime_dir, "hostsvc.pid").unlink(missing_ok=True)

    def _nginx_preexec(self) -> None:
        """Runs in nginx's child before exec: SIGTERM (nginx's fast shutdown, which also
        stops its workers) when the supervisor dies."""
        set_parent_death_signal(signal.SIGTERM, expected_ppid=self.pid)

    def _install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe()
        for fd in (self.wakeup_r, self.wakeup_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wakeup_w)
        for sig in (signal.SIGHUP, *STOP_SIGNALS):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # only wakes select()

    def _on_signal(self, sig: int, frame: Any) -> None:
        self.signals.append(sig)

    def _stop_requested(self) -> bool:
        """A stop signal is queued: long waits (starts, reloads) give way to it."""
        return any(s in STOP_SIGNALS for s in self.signals)

    # -- start ----------------------------------------------------------------------------
    def start(self) -> bool:
        """Start every pool, wait for them (NGINX_AFTER at most: one slow app must not keep
        the others offline), then nginx. False if nginx cannot start."""
        assert self.cfg is not None
        t0 = time.monotonic()
        log.info("starting %d apps from %s (runtime dir %s)...", len(self.cfg.apps),
                 self.config_path, self.runtime_dir)
        for app in self.cfg.apps:
            self.apps[app.name] = st = AppState(app, self._new_socket_path(app.name))
            self._start_pool(st)
        self._wait_ready([st for st in self.apps.values()], limit=NGINX_AFTER)
        self.nginx = Nginx(self.runtime_dir)
        try:
            self.nginx.write_config(self._render())
            self.nginx.start(preexec_fn=self._nginx_preexec)
        except NginxError as exc:
            log.error("%s", _fmt("nginx_failed", error=exc))
            return False
        ready = [n for n, st in self.apps.items() if st.state == "running"]
        starting = [n for n, st in self.apps.items() if st.state == "starting"]
        failed = [n for n, st in self.apps.items() if st.state not in ("running", "starting")]
        log.info("%s", _fmt("nginx_started", "nginx", self.nginx.pid))
        summary = ("all apps ready" if len(ready) == len(self.apps) else
                   f"{len(ready)} of {len(self.apps)} apps ready ("
                   + "; ".join(part for part in (
                       f"still starting: {', '.join(starting)}" if starting else "",
                       f"not running: {', '.join(failed)}" if failed else "") if part)
                   + "; their prefixes answer 503 until they are)")
        log.info("nginx listening on %s, %s in %.1fs", ", ".join(self.cfg.listen), summary,
                 time.monotonic() - t0)
        self.write_state()
        return True

    def _new_socket_path(self, name: str) -> str:
        """A path never used before by this supervisor: blue/green needs a fresh one."""
        gen = self._generations.get(name, 0) + 1
        self._generations[name] = gen
        return os.path.join(self.runtime_dir, "sockets", f"{name}.{gen}.sock")

    def _start_pool(self, st: AppState) -> None:
        assert self.cfg is not None
        st.pool = Pool(st.app, st.socket_path, metrics=self.metrics_server is not None)
        st.pool.start()
        st.state = "starting"
        st.generation = self._generations.get(st.app.name, 1)
        log.info("%s", _fmt("starting", st.app.name, st.pool.pid, engine=st.app.engine,
                            workers=st.app.workers, socket=st.socket_path))

    def _wait_ready(self, states: list[AppState], limit: float = START_TIMEOUT) -> None:
        """Block until each pool is ready or failed (a hung start fails after
        START_TIMEOUT in _check_pool), `limit` seconds at most; TERM/INT cut it short.
        The serving apps are watched meanwhile, so a crash elsewhere during a reload is
        restarted as usual instead of waiting for the reload to finish."""
        deadline = time.monotonic() + limit
        while any(st.state == "starting" for st in states) and time.monotonic() < deadline:
            self._check_pools(states)
            self.write_state(scan=False)
            if self._stop_requested():
                return
            self._sleep(0.05)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._sleep(TICK)
            while self.signals:
                sig = self.signals.pop(0)
                if sig in STOP_SIGNALS:
                    log.info("%s", _fmt("signal", signal=signal.Signals(sig).name))
                    return
                if sig == signal.SIGHUP:
                    self.reload("SIGHUP")
            self._check_pools()
            self._check_draining()
            self._check_nginx()
            if self.watch:
                self._check_config_file()
            self.write_state()

    def _check_pools(self, extra: Sequence[AppState] = ()) -> None:
        """_check_pool for every serving app, and for `extra` (a reload's new pools)."""
        serving = list(self.apps.values())
        for st in serving + [st for st in extra if not any(st is s for s in serving)]:
            self._check_pool(st)

    def _sleep(self, seconds: float) -> None:
        try:
            select.select([self.wakeup_r], [], [], seconds)
            os.read(self.wakeup_r, 512)
        except (BlockingIOError, InterruptedError):
            pass

    def _check_pool(self, st: AppState) -> None:
        """Readiness, crashes and due restarts for one app."""
        now = time.monotonic()
        pool = st.pool
        if st.state == "starting" and pool is not None:
            ready = pool.poll_ready()
            if ready:
                st.state = "running"
                st.last_error = None
                log.info("%s", _fmt("started", st.app.name, pool.pid, workers=st.app.workers,
                                    ready_in=f"{pool.ready_at - pool.started_at:.2f}s"))
            elif ready is False or not pool.alive():
                self._pool_failed(st, f"exited with status {pool.exit_code()} while starting")
            elif time.time() - pool.started_at > START_TIMEOUT:
                self._pool_failed(st, f"not ready after {START_TIMEOUT:.0f}s while starting")
        elif st.state == "running" and pool is not None:
            if not pool.alive():
                self._pool_failed(st, f"exited with status {pool.exit_code()}")
            elif st.failures and time.time() - pool.ready_at > STABLE_AFTER:
                st.failures = 0
        elif st.state in ("backoff", "crashloop") and now >= st.restart_at:
            st.restarts += 1
            log.info("%s", _fmt("restarting", st.app.name, restarts=st.restarts))
            self._start_pool(st)   # same socket path: the old arbiter is gone

    def _pool_failed(self, st: AppState, why: str) -> None:
        """Schedule a restart with exponential backoff, and say so."""
        pid = st.pool.pid if st.pool else None
        if st.pool is not None:
            st.pool.kill()      # leftover workers of a dead or hung arbiter
            st.pool.exit_code()
        st.failures += 1
        delay = min(BACKOFF_START * 2 ** (st.failures - 1), BACKOFF_MAX)
        st.restart_at = time.monotonic() + delay
        st.state = "crashloop" if st.failures >= CRASHLOOP_AFTER else "backoff"
        st.last_error = why
        st.worker_pids = []
        log.warning("%s", _fmt("exited" if "starting" not in why else "failed_to_start",
                               st.app.name, pid, error=repr(why), state=st.state,
                               restart_in=f"{delay:.0f}s"))

    def _reap_orphans(self) -> None:
        """As PID 1 in a container, orphans (say, a killed nginx master's workers) are
        re-parented to us: reap their zombies, but only those that are no Popen's own."""
        ours = {p.pid for p in self._pools()} | {self.nginx.pid if self.nginx else None}
        for pid in children_of(self.pid, zombies=True):
            if pid not in ours:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _pools(self) -> list[Pool]:
        """Every pool this supervisor still owns: serving, starting, or draining."""
        return [st.pool for st in self.apps.values() if st.pool] + \
            [p for p, _ in self.draining]

    def _check_draining(self) -> None:
        keep = []
        for pool, deadline in self.draining:
            if not pool.alive():
                log.info("%s", _fmt("stopped", pool.app.name, pool.pid, code=pool.exit_code()))
            elif time.monotonic() > deadline:
                log.warning("%s", _fmt("killed", pool.app.name, pool.pid,
                                       reason="graceful timeout"))
                pool.kill()
            else:
                keep.append((pool, deadline))
        self.draining = keep

    def _check_nginx(self) -> None:
        if self.nginx is None or self.nginx.alive():
            return
        now = time.monotonic()
        if not self.nginx_restart_at:
            self.nginx_failures += 1
            delay = min(BACKOFF_START * 2 ** (self.nginx_failures - 1), BACKOFF_MAX)
            log.error("%s", _fmt("nginx_exited", "nginx", self.nginx.pid,
                                 code=self.nginx.proc.returncode, restart_in=f"{delay:.0f}s"))
            # Workers of a killed master live on holding the port: stop them first.
            for pid in self.nginx_workers:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.nginx_restart_at = now + delay
        elif now >= self.nginx_restart_at:
            self.nginx_restart_at = 0.0
            try:
                self.nginx.start(preexec_fn=self._nginx_preexec)
                self.nginx_failures = 0
                log.info("%s", _fmt("nginx_started", "nginx", self.nginx.pid))
            except NginxError as exc:
                log.error("%s", _fmt("nginx_failed", error=exc))

    def _digest(self) -> str:
        try:
            return hashlib.sha256(Path(self.config_path).read_bytes()).hexdigest()
        except OSError:
            return self.config_digest

    def _check_config_file(self) -> None:
        """--watch: poll the file's content (follows symlinks, so ConfigMap swaps count)."""
        digest = self._digest()
        if digest != self.config_digest:
            self.config_digest = digest
            self.reload("config file changed")

    # -- reload ---------------------------------------------------------------------------
    def reload(self, reason: str) -> bool:
        """Apply the config file again, blue/green; a file that fails validation changes
        nothing. Returns whether the new config is in force."""
        assert self.cfg is not None and self.nginx is not None
        log.info("%s", _fmt("reloading", reason=repr(reason)))
        self.config_digest = self._digest()
        try:
            new = self._load_config()
        except ConfigError as exc:
            return self._reload_done(False, f"invalid config, nothing changed: "
                                            f"{'; '.join(exc.errors)}")
        if new.runtime_dir != self.runtime_dir:
            log.warning("runtime_dir changes take effect on restart; keeping %s",
                        self.runtime_dir)
            new = replace(new, runtime_dir=self.runtime_dir)
        old_names = set(self.apps)
        added = [a for a in new.apps if a.name not in old_names]
        changed = [a for a in new.apps if a.name in old_names
                   and a.fingerprint() != self.apps[a.name].app.fingerprint()]
        removed = [n for n in self.apps if new.app(n) is None]

        # 1. start the new pools (green) next to the running ones (blue)
        fresh = {a.name: AppState(a, self._new_socket_path(a.name)) for a in added + changed}
        for st in fresh.values():
            self._start_pool(st)
        self._wait_ready(list(fresh.values()))
        if self._stop_requested():
            self._retire([st.pool for st in fresh.values() if st.pool])
            return self._reload_done(False, "interrupted by a stop signal")

        # 2. the new set of apps: a changed app whose new version failed keeps running
        kept_old = [a.name for a in changed if fresh[a.name].state != "running"]
        apps: dict[str, AppState] = {}
        for a in new.apps:
            if a.name in fresh and a.name not in kept_old:
                apps[a.name] = fresh[a.name]
            else:
                apps[a.name] = self.apps[a.name]
                if a.name not in kept_old:
                    apps[a.name].app = a    # unchanged: new line numbers only
        for name in kept_old:
            log.error("%s", _fmt("replace_failed", name, error=repr(fresh[name].last_error),
                                 kept="the running version"))
            self._retire([fresh[name].pool])
        old_apps, old_cfg = self.apps, self.cfg
        self.apps, self.cfg = apps, new
        if new.metrics.listen != old_cfg.metrics.listen:
            log.warning("metrics.listen changes take effect on restart; keeping %s",
                        old_cfg.metrics.listen or "off")
            self.cfg = new = replace(new, metrics=replace(
                new.metrics, listen=old_cfg.metrics.listen))
        self._state_snapshot = self.state()   # added apps are known to the metrics server

        # 3. point nginx at them: test the config, reload, wait for old workers to drain
        try:
            self.nginx.write_config(self._render())
            if not self._reload_nginx():
                # nginx kept its old config (e.g. a new port in use): so do we.
                self.apps, self.cfg = old_apps, old_cfg
                self.nginx.write_config(self._render())
                raise NginxError("nginx did not take the new config (see its error above); "
                                 "it keeps serving the old one")
        except Exception as exc:  # noqa: BLE001 - any failure here must keep the old config
            self.apps, self.cfg = old_apps, old_cfg
            if not isinstance(exc, NginxError):
                log.exception("reload: rendering or installing the nginx config failed")
                try:   # leave the old config on disk too, for the next nginx restart
                    self.nginx.write_config(self._render())
                except Exception:  # noqa: BLE001 - already failing; the old one still runs
                    log.exception("reload: could not rewrite the previous nginx config")
            self._retire([st.pool for st in fresh.values() if st.pool])
            return self._reload_done(False, str(exc))

        # 4. only now stop what nginx no longer routes to
        replaced = [old_apps[a.name].pool for a in changed if a.name not in kept_old]
        self._retire(replaced + [old_apps[n].pool for n in removed])
        summary = "; ".join(f"{what}: {', '.join(names)}" for what, names in (
            ("added", [a.name for a in added]),
            ("replaced", [a.name for a in changed if a.name not in kept_old]),
            ("removed", removed), ("failed, kept old", kept_old)) if names) or "no app changes"
        return self._reload_done(not kept_old, summary)

    def _reload_nginx(self) -> bool:
        """SIGHUP nginx; once new workers run, wait for the old ones to drain and exit.

        False if no new worker appeared: nginx rejected the config at reload time (what
        `nginx -t` cannot see, such as a port already in use) and still runs the old one.
        """
        assert self.nginx is not None and self.cfg is not None
        before = set(children_of(self.nginx.pid)) if self.nginx.pid else set()
        self.nginx.reload()
        started = time.monotonic()
        while not set(children_of(self.nginx.pid)) - before:
            if time.monotonic() - started > 8 or not self.nginx.alive():
                log.error("%s", _fmt("nginx_reload_failed", "nginx", self.nginx.pid))
                return False
            self._sleep(0.05)
        deadline = started + self.cfg.grace_period + 5
        while time.monotonic() < deadline and set(children_of(self.nginx.pid)) & before \
                and not self._stop_requested():
            self._check_pools()     # apps keep being restarted while old workers drain
            self.write_state(scan=False)
            self._sleep(0.05)
        log.info("%s", _fmt("nginx_reloaded", "nginx", self.nginx.pid))
        return True

    def _retire(self, pools: list[Pool | None]) -> None:
        """TERM pools; the loop reaps them and KILLs any still alive after their grace."""
        for pool in pools:
            if pool is None:
                continue
            if pool.alive():
                log.info("%s", _fmt("stopping", pool.app.name, pool.pid))
                pool.terminate()
                self.draining.append((pool, time.monotonic() + pool.app.graceful_timeout + 5))
            else:
                pool.terminate()

    def _reload_done(self, ok: bool, message: str) -> bool:
        self.last_reload = {"at": time.time(), "ok": ok, "message": message}
        self.reloads["ok" if ok else "failed"] += 1
        if ok:
            self.reloads["last_success"] = self.last_reload["at"]
        log.log(logging.INFO if ok else logging.ERROR, "%s",
                _fmt("reloaded" if ok else "reload_failed", message=repr(message)))
        self.write_state()
        return ok

    def _render(self) -> str:
        """nginx.conf for the apps as they run now (a failed replacement keeps its old
        settings), each app routed to its current socket."""
        assert self.cfg is not None
        effective = replace(self.cfg, apps=[st.app for st in self.apps.values()],
                            metrics=replace(self.cfg.metrics,
                                            upstream_token=self.upstream_token))
        return render(effective, {n: st.socket_path for n, st in self.apps.items()},
                      self.runtime_dir, self.status_port)

    # -- stop -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop accepting, drain in-flight requests up to the grace period, stop children."""
        grace = self.cfg.grace_period if self.cfg else 30
        log.info("stopping: draining requests for up to %.0fs", grace)
        if self.nginx is not None and self.nginx.alive():
            self.nginx.stop(graceful=True)
            if not self.nginx.wait(grace):
                self.nginx.stop(graceful=False)
                self.nginx.wait(5)
            log.info("%s", _fmt("nginx_stopped", "nginx", self.nginx.pid))
        pools = self._pools()
        for st in self.apps.values():
            st.state = "stopping"
        for pool in pools:
            pool.terminate()
        # gunicorn gives in-flight requests graceful_timeout after TERM; allow that.
        limit = time.monotonic() + max([p.app.graceful_timeout for p in pools] or [0]) + 3
        while any(p.alive() for p in pools) and time.monotonic() < limit:
            self._sleep(0.05)
        for pool in pools:
            if pool.alive():
                log.warning("%s", _fmt("killed", pool.app.name, pool.pid, reason="grace period"))
                pool.kill()
                pool.proc.wait(5)
            else:
                log.info("%s", _fmt("stopped", pool.app.name, pool.pid, code=pool.exit_code()))
        self.draining = []
        for st in self.apps.values():
            st.state = "stopped"
        self.write_state(force=True)
        log.info("stopped")

    # -- state.json -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The document behind `hostsvc status` (schema: docs/config.md)."""
        apps = {}
        for name, st in self.apps.items():
            pool = st.pool
            alive = pool is not None and pool.alive()
            apps[name] = {
                "prefix": st.app.prefix, "hosts": st.app.hosts, "kind": st.app.kind,
                "target": st.app.target, "engine": st.app.engine, "state": st.state,
                "pid": pool.pid if alive else None,
                "workers": st.app.workers, "threads": st.app.threads,
                "worker_pids": st.worker_pids if alive else [],
                "workers_alive": len(st.worker_pids) if alive else 0,
                "restarts": st.restarts, "generation": st.generation,
                "socket": st.socket_path,
                "started_at": pool.started_at if pool else None,
                "ready_at": pool.ready_at or None if pool else None,
                "last_error": st.last_error,
            }
        return {
            "version": STATE_VERSION,
            "supervisor_pid": os.getpid(),
            "config_path": self.cfg.path if self.cfg else self.config_path,
            "runtime_dir": self.runtime_dir,
            "listen": self.cfg.listen if self.cfg else [],
            "started_at": self.started_at,
            "nginx": {"pid": self.nginx.pid if self.nginx and self.nginx.alive() else None,
                      "state": "running" if self.nginx and self.nginx.alive() else "stopped"},
            "last_reload": self.last_reload,
            "reloads": dict(self.reloads),
            "metrics": self._metrics_info(),
            "apps": apps,
        }

    def _metrics_info(self) -> dict[str, Any]:
        """Where the metrics listener is (state.json's `metrics`), nulls when off."""
        listen = self.cfg.metrics.listen if self.cfg and self.metrics_server else None
        return {"listen": listen,
                "url": f"http://{metrics_address(listen)}/metrics" if listen else None}

    def write_state(self, force: bool = False, scan: bool = True) -> None:
        """Rewrite RUNTIME/state.json atomically if anything in it changed.

        `scan` (at most once a second) also refreshes worker pids from /proc and reaps
        orphans. The waits of a start or reload write without it: their new pools are not
        yet among the apps, so an orphan sweep could reap one of them and hide its exit
        status from its Popen; states and restarts still reach `hostsvc status` at once.
        """
        if scan and (time.monotonic() >= self._next_scan or force):
            self._next_scan = time.monotonic() + 1.0
            for st in self.apps.values():
                st.worker_pids = st.pool.worker_pids() if st.pool and st.state == "running" \
                    else []
            if self.nginx is not None and self.nginx.alive():
                self.nginx_workers = children_of(self.nginx.pid)
            self._reap_orphans()
        doc = self.state()
        self._state_snapshot = doc      # what the metrics server's threads read
        text = json.dumps(doc, indent=2, sort_keys=True)
        if text == self._last_state and not force:
            return
        self._last_state = text
        doc["updated_at"] = time.time()
        _atomic_write(Path(self.runtime_dir, "state.json"),
                      json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for nginx's stub_status server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
