"""MetricsServer: /metrics, /healthz, /readyz and the upstream-error endpoint, in the supervisor.

Everything about pools is computed at scrape time from the supervisor's `state()` dict
and /proc (a custom collector is fine here: it runs in the supervisor process, not in
a worker); request metrics come from the multiprocess directory. nginx's stub_status is
fetched per scrape too, so nothing runs between scrapes.

`state()` shape (the supervisor's `Supervisor.state()` already provides most of it):

    {"started_at": float,
     "apps": {name: {"prefix": str, "state": "starting|running|backoff|crashloop|
                                              failed|stopping|stopped",
                     "pid": int | None,           # the arbiter
                     "workers": int,              # configured
                     "worker_pids": [int],
                     "restarts": int,             # pool restarts
                     "ready": bool}},             # optional: default state == "running"
     "reloads": {"ok": int, "failed": int, "last_success": float | None}}   # optional
"""
from __future__ import annotations

import hmac
import json
import os
import platform
import re
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from .. import __version__
from ..procs import proc_usage
from .multiproc import archive_dead_processes, locked, multiproc_dir
from .spec import SPEC, mp_metrics
from .wsgi import KNOWN_METHODS

POOL_STATES = ("starting", "running", "backoff", "crashloop", "failed", "stopping",
               "stopped")
NOT_SERVING_ON_PURPOSE = ("stopping", "stopped")
UPSTREAM_ERROR_RE = re.compile(r"^/_hostsvc/upstream-error/([a-z0-9][a-z0-9_-]{0,62})/"
                               r"(502|503|504)$")
# What the client gets for the upstream status nginx saw: a pool that is not there is
# "unavailable" (as proxy.py already answers), a pool too slow stays a gateway timeout.
ANSWER = {"502": 503, "503": 503, "504": 504}
STUB_STATUS_RE = re.compile(
    r"Active connections:\s*(\d+).*?\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n"
    r"Reading:\s*(\d+)\s+Writing:\s*(\d+)\s+Waiting:\s*(\d+)", re.S)
def fetch_stub_status(url: str, timeout: float = 1.0) -> dict[str, int] | None:
    """nginx stub_status numbers, or None when nginx does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read(4096).decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    m = STUB_STATUS_RE.search(text)
    if not m:
        return None
    keys = ("active", "accepted", "handled", "requests", "reading", "writing", "waiting")
    return dict(zip(keys, map(int, m.groups())))


class _Monotonic:
    """Counters derived from numbers that restart from zero (a replaced pool's restart
    count, a new arbiter's CPU time): a drop is taken as a reset, so the exported
    total stays where it was and grows again from there."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, ...], tuple[float, float]] = {}   # key -> (raw, offset)

    def __call__(self, key: tuple[str, ...], raw: float) -> float:
        last, offset = self.seen.get(key, (0.0, 0.0))
        if raw < last:
            offset += last - raw
        self.seen[key] = (raw, offset)
        return raw + offset


class SupervisorCollector:
    """Scrape-time metrics: pools from state() and /proc, supervisor, nginx."""

    def __init__(self, state: Callable[[], dict[str, Any]],
                 nginx_status_url: str | None) -> None:
        self.state = state
        self.nginx_status_url = nginx_status_url
        self.monotonic = _Monotonic()
        self.versions = {"version": __version__, "python": platform.python_version(),
                         "gunicorn": _gunicorn_version()}

    def _family(self, name: str) -> Any:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            UnknownMetricFamily)

        spec = SPEC[name]
        cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
               "untyped": UnknownMetricFamily}[spec.kind]
        return cls(name, spec.help, labels=spec.labels or None)

    def collect(self) -> Iterator[Any]:
        """The registry's entry point: one state() call per scrape."""
        doc = self.state()
        yield from self._pools(doc.get("apps", {}))
        yield from self._supervisor(doc)
        if self.nginx_status_url:
            yield from self._nginx()

    def _pools(self, apps: dict[str, dict[str, Any]]) -> Iterator[Any]:
        workers = self._family("hostsvc_pool_workers")
        states = self._family("hostsvc_pool_state")
        ready = self._family("hostsvc_app_ready")
        restarts = self._family("hostsvc_pool_restarts_total")
        rss = self._family("hostsvc_pool_memory_rss_bytes")
        cpu = self._family("hostsvc_pool_cpu_seconds_total")
        for name, app in sorted(apps.items()):
            workers.add_metric([name, "configured"], app.get("workers", 0))
            workers.add_metric([name, "live"], len(app.get("worker_pids") or []))
            for st in POOL_STATES:
                states.add_metric([name, st], 1.0 if app.get("state") == st else 0.0)
            ready.add_metric([name], 1.0 if app_ready(app) else 0.0)
            restarts.add_metric([name], self.monotonic(("restarts", name),
                                                       app.get("restarts", 0)))
            total_rss, total_cpu = 0, 0.0
            pids = [(app["pid"], True)] if app.get("pid") else []
            for pid, arbiter in pids + [(p, False) for p in app.get("worker_pids") or []]:
                usage = proc_usage(pid, with_children=arbiter)
                if usage:
                    total_rss += usage[0]
                    total_cpu += usage[1]
            rss.add_metric([name], total_rss)
            cpu.add_metric([name], self.monotonic(("cpu", name), total_cpu))
        yield from (workers, states, ready, restarts, rss, cpu)

    def _supervisor(self, doc: dict[str, Any]) -> Iterator[Any]:
        reloads = doc.get("reloads") or {}
        total = self._family("hostsvc_config_reloads_total")
        total.add_metric(["success"], self.monotonic(("reloads", "ok"), reloads.get("ok", 0)))
        total.add_metric(["failure"], self.monotonic(("reloads", "failed"),
                                                     reloads.get("failed", 0)))
        last = self._family("hostsvc_config_last_reload_success_timestamp_seconds")
        last.add_metric([], reloads.get("last_success") or doc.get("started_at", 0.0))
        build = self._family("hostsvc_build_info")
        build.add_metric([self.versions[k] for k in SPEC["hostsvc_build_info"].labels], 1.0)
        start = self._family("hostsvc_start_time_seconds")
        start.add_metric([], doc.get("started_at", 0.0))
        yield from (total, last, build, start)

    def _nginx(self) -> Iterator[Any]:
        assert self.nginx_status_url is not None
        status = fetch_stub_status(self.nginx_status_url)
        up = self._family("nginx_up")
        up.add_metric([], 1.0 if status else 0.0)
        yield up
        if not status:
            return
        for key in ("active", "reading", "writing", "waiting", "accepted", "handled"):
            family = self._family(f"nginx_connections_{key}")
            family.add_metric([], status[key])
            yield family
        requests = self._family("nginx_http_requests_total")
        requests.add_metric([], status["requests"])
        yield requests


def _gunicorn_version() -> str:
    try:
        import gunicorn
        return gunicorn.__version__
    except ImportError:      # pragma: no cover - gunicorn is a dependency
        return "none"


def app_ready(app: dict[str, Any]) -> bool:
    """Whether an app serves: its `ready` flag, or else whether its pool is running."""
    return bool(app.get("ready", app.get("state") == "running"))


def not_ready(apps: dict[str, dict[str, Any]]) -> list[str]:
    """Apps that should serve and do not (stopping/stopped ones are not expected to)."""
    return sorted(n for n, a in apps.items()
                  if a.get("state") not in NOT_SERVING_ON_PURPOSE and not app_ready(a))


class MetricsServer:
    """The supervisor's HTTP endpoint for Prometheus, probes and nginx's error routing.

    A thread of the supervisor (ThreadingHTTPServer, one thread per connection), so a
    slow scrape never blocks the supervisor's loop and vice versa. `state` is called
    from those threads: give it a snapshot, not live objects. prepare_multiproc_dir()
    (or `multiproc_path`) must come first.
    """

    def __init__(self, state: Callable[[], dict[str, Any]], listen: str = "127.0.0.1:9090",
                 nginx_status_url: str | None = None, multiproc_path: str | None = None,
                 upstream_token: str = "") -> None:
        self.state = state
        # When set, upstream-error reports must carry it (nginx sends it): anyone else
        # who can reach the listener could otherwise inflate the error counters.
        self.upstream_token = upstream_token
        host, _, port = listen.rpartition(":")
        self.address = (host.strip("[]") or "127.0.0.1", int(port))
        self.path = multiproc_dir(multiproc_path)
        self.collector = SupervisorCollector(state, nginx_status_url)
        self.scrape_lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self.httpd is not None
        return self.httpd.server_address[1]

    def start(self) -> None:
        """Bind and serve in a daemon thread."""
        server = self

        class Handler(_Handler):
            metrics = server

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET

        self.httpd = Server(self.address, Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       name="hostsvc-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.thread is not None:
            self.thread.join(5)
            self.thread = None

    def render(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) of one scrape, in the format `accept` asks for."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder
        from prometheus_client.multiprocess import MultiProcessCollector

        encoder, content_type = choose_encoder(accept)
        with self.scrape_lock:      # _Monotonic state is shared between scrapes
            archive_dead_processes(self.path)
            # Files are read under the shared lock, so no merge is half seen; the rest
            # (state, /proc, nginx) is collected after releasing it.
            with locked(self.path, exclusive=False):
                files = list(MultiProcessCollector(None, path=self.path).collect())
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Fixed(files))
            registry.register(self.collector)
            return encoder(registry), content_type

    def upstream_error(self, app: str, code: str, method: str) -> int | None:
        """Count a request nginx answered itself for `app`; the status to answer, or
        None if `app` is unknown (bounds the label values to configured apps)."""
        if app not in (self.state().get("apps") or {}):
            return None
        answer = ANSWER[code]
        metrics = mp_metrics()
        metrics["hostsvc_proxy_errors_total"].labels(app, code).inc()
        metrics["hostsvc_http_requests_total"].labels(
            app, method if method in KNOWN_METHODS else "other", str(answer),
            f"{str(answer)[0]}xx").inc()
        return answer


class _Fixed:
    """A collector of already collected metric families."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


class _Handler(BaseHTTPRequestHandler):
    metrics: MetricsServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the supervisor's log: stay quiet."""

    def _send(self, code: int, body: bytes, content_type: str,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        m = UPSTREAM_ERROR_RE.match(path)
        if m:
            token = self.metrics.upstream_token
            if token and not hmac.compare_digest(
                    self.headers.get("X-Hostsvc-Upstream-Token", ""), token):
                self._send(403, b"upstream errors are reported by hostsvc's nginx only\n",
                           "text/plain; charset=utf-8")
                return
            raw = self.headers.get("Content-Length") or "0"
            if not raw.isdigit():
                self._send(400, b"bad Content-Length\n", "text/plain; charset=utf-8")
                return
            if int(raw):
                self.rfile.read(int(raw))    # keep the connection usable
            answer = self.metrics.upstream_error(m.group(1), m.group(2), self.command)
            if answer is None:
                self._send(404, b"unknown app\n", "text/plain; charset=utf-8")
            else:
                text = ("503 Service Unavailable: this app is not running\n" if answer == 503
                        else "504 Gateway Timeout: this app did not answer in time\n")
                self._send(answer, text.encode(), "text/plain; charset=utf-8",
                           {"Retry-After": "5"} if answer == 503 else None)
        elif self.command not in ("GET", "HEAD"):
            self._send(405, b"method not allowed\n", "text/plain; charset=utf-8",
                       {"Allow": "GET, HEAD"})
        elif path == "/metrics":
            body, content_type = self.metrics.render(self.headers.get("Accept", ""))
            self._send(200, body, content_type)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            missing = not_ready(self.metrics.state().get("apps") or {})
            body = json.dumps({"ready": not missing, "not_ready": missing}).encode() + b"\n"
            self._send(503 if missing else 200, body, "application/json")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def __getattr__(self, name: str) -> Any:
        """Every method (`do_GET`, `do_PURGE`, ...) goes to _handle: nginx forwards a
        failed request to the upstream-error endpoint with the client's method."""
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)
