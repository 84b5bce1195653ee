"""What the status page shows, gathered from hostsvc's two documented local interfaces:

- `RUNTIME/state.json` (docs/config.md): apps, prefixes, states, workers, restarts;
- the metrics server's `/metrics` (docs/metrics.md), found through state.json's
  `metrics.url` (or $STATUS_METRICS_URL), parsed with prometheus_client's text parser:
  request and 5xx counters and the duration histogram per app.

Rates need two samples of the counters. Each worker process keeps its own ring buffer of
samples in memory (`Window`), filled when a client asks for the status (no background
thread): the rate over the last minutes is (newest - oldest sample in the window) /
elapsed time. So with several workers each computes its own window from the samples it
took; the status app runs one worker (config/hostsvc.yaml) so that every refresh of the
page adds to the same window. Nothing is written to disk.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_METRICS = "127.0.0.1:9090"
MIN_SCRAPE_INTERVAL = 1.0      # seconds: status requests closer together share a scrape


def runtime_dir() -> str:
    """$STATUS_RUNTIME_DIR, else $HOSTSVC_RUNTIME_DIR, else ./run (what hostsvc defaults to;
    a relative path is relative to the supervisor's working directory, which pools share)."""
    raw = os.environ.get("STATUS_RUNTIME_DIR") or os.environ.get("HOSTSVC_RUNTIME_DIR") or "run"
    return os.path.abspath(os.path.expanduser(raw))


def metrics_url(state: dict[str, Any] | None = None) -> tuple[str | None, str]:
    """(URL of /metrics or None, where that came from).

    $STATUS_METRICS_URL wins: a URL, or what `metrics.listen` accepts (`host:port`, a bare
    port), or `off`. Else state.json's `metrics.url` (null: the supervisor runs no
    metrics). Else, for a supervisor whose state.json predates that key, 127.0.0.1:9090."""
    raw = (os.environ.get("STATUS_METRICS_URL") or "").strip()
    if raw:
        source = "STATUS_METRICS_URL"
    elif state is not None and isinstance(state.get("metrics"), dict):
        return state["metrics"].get("url"), "state.json"
    else:
        raw, source = DEFAULT_METRICS, "default"
    if raw.lower() in ("off", "none", "false", "0"):
        return None, source
    if raw.startswith(("http://", "https://")):
        return raw, source
    if raw.isdigit():
        raw = f"127.0.0.1:{raw}"
    host, _, port = raw.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}/metrics", source


def read_state(directory: str) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) or (None, why not). state.json is replaced atomically, so a read
    never sees half a file."""
    path = os.path.join(directory, "state.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh), None
    except FileNotFoundError:
        return None, f"{path} does not exist: is hostsvc running with this runtime dir?"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- metrics ---------------------------------------------------------------------------------
@dataclass
class AppSample:
    """Cumulative numbers of one app at one scrape."""

    requests: float = 0.0
    errors: float = 0.0                     # 5xx
    duration_sum: float = 0.0
    duration_count: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)   # le -> cumulative count
    in_flight: float | None = None
    rss_bytes: float | None = None
    cpu_seconds: float | None = None


def scrape(url: str, timeout: float = 2.0) -> dict[str, AppSample]:
    """One scrape of /metrics, summed per app (over methods and codes)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8", "replace")
    apps: dict[str, AppSample] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            app = s.labels.get("app")
            if app is None:
                continue
            a = apps.setdefault(app, AppSample())
            if s.name == "hostsvc_http_requests_total":
                a.requests += s.value
                if s.labels.get("code_class") == "5xx" or s.labels.get("code", "").startswith("5"):
                    a.errors += s.value
            elif s.name == "hostsvc_http_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                a.buckets[le] = a.buckets.get(le, 0.0) + s.value
            elif s.name == "hostsvc_http_request_duration_seconds_sum":
                a.duration_sum += s.value
            elif s.name == "hostsvc_http_request_duration_seconds_count":
                a.duration_count += s.value
            elif s.name == "hostsvc_http_requests_in_flight":
                a.in_flight = (a.in_flight or 0.0) + s.value
            elif s.name == "hostsvc_pool_memory_rss_bytes":
                a.rss_bytes = s.value
            elif s.name == "hostsvc_pool_cpu_seconds_total":
                a.cpu_seconds = s.value
    return apps


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets: linear interpolation inside
    the bucket holding the q-th observation; in the +Inf bucket, the highest finite bound."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_bound
            if count == prev_count:
                return le
            return prev_bound + (le - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = le, count
    return prev_bound


class Window:
    """The samples one process took in the last `seconds`, oldest first (a ring buffer)."""

    def __init__(self, seconds: float = 300.0, maxlen: int = 2000) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[float, float | None, dict[str, AppSample]]] = deque(maxlen=maxlen)
        self.lock = threading.Lock()

    def add(self, now: float, started_at: float | None, apps: dict[str, AppSample]) -> None:
        with self.lock:
            if self.samples and self.samples[-1][1] != started_at:
                self.samples.clear()          # the supervisor restarted: counters restarted
            self.samples.append((now, started_at, apps))
            # keep one sample at or before the window's start, so the window is full-length
            while len(self.samples) > 2 and self.samples[1][0] <= now - self.seconds:
                self.samples.popleft()

    def recent(self, now: float, max_age: float) -> dict[str, AppSample] | None:
        """The newest sample if it is younger than `max_age` (several open pages then
        share one scrape a second instead of each scraping)."""
        with self.lock:
            if self.samples and 0 <= now - self.samples[-1][0] < max_age:
                return self.samples[-1][2]
        return None

    def rates(self, now: float) -> tuple[float, dict[str, dict[str, Any]]]:
        """(seconds covered, per-app rates) between the oldest and the newest sample."""
        with self.lock:
            if len(self.samples) < 2:
                return 0.0, {}
            (t0, _, old), (t1, _, new) = self.samples[0], self.samples[-1]
        elapsed = t1 - t0
        out: dict[str, dict[str, Any]] = {}
        if elapsed <= 0:
            return 0.0, out
        for name, cur in new.items():
            prev = old.get(name, AppSample())
            reqs = max(cur.requests - prev.requests, 0.0)
            errs = max(cur.errors - prev.errors, 0.0)
            count = max(cur.duration_count - prev.duration_count, 0.0)
            dsum = max(cur.duration_sum - prev.duration_sum, 0.0)
            delta = {le: max(v - prev.buckets.get(le, 0.0), 0.0) for le, v in cur.buckets.items()}
            p50, p95 = quantile(0.5, delta), quantile(0.95, delta)
            cpu = (None if cur.cpu_seconds is None or prev.cpu_seconds is None
                   else max(cur.cpu_seconds - prev.cpu_seconds, 0.0) / elapsed)
            out[name] = {
                "requests": reqs,
                "rate_per_s": reqs / elapsed,
                "errors": errs,
                "errors_per_s": errs / elapsed,
                "error_ratio": (errs / reqs) if reqs else None,
                "latency_mean_ms": (dsum / count * 1000) if count else None,
                "latency_p50_ms": None if p50 is None else p50 * 1000,
                "latency_p95_ms": None if p95 is None else p95 * 1000,
                "cpu_ratio": cpu,
            }
        return elapsed, out


# -- the status document -----------------------------------------------------------------
APP_FIELDS = ("prefix", "hosts", "kind", "target", "engine", "state", "pid", "workers",
              "threads", "workers_alive", "restarts", "generation", "started_at", "ready_at",
              "last_error")


def status(window: Window, now: float | None = None) -> dict[str, Any]:
    """The JSON the page renders (and `GET /status/api/status` returns)."""
    now = time.time() if now is None else now
    rdir = runtime_dir()
    state, state_error = read_state(rdir)
    url, source = metrics_url(state)
    metrics: dict[str, Any] = {"url": url, "source": source, "ok": False, "error": None,
                               "window_seconds": 0.0, "window_target_seconds": window.seconds}
    scraped: dict[str, AppSample] = {}
    if url is None:
        metrics["error"] = ("metrics are off (STATUS_METRICS_URL=off)" if source != "state.json"
                            else "the supervisor runs no metrics server (metrics: off)")
    elif (fresh := window.recent(now, MIN_SCRAPE_INTERVAL)) is not None:
        scraped, metrics["ok"] = fresh, True
    else:
        try:
            scraped = scrape(url)
            metrics["ok"] = True
            window.add(now, (state or {}).get("started_at"), scraped)
        except Exception as exc:  # noqa: BLE001 - any failure: show state without rates
            metrics["error"] = f"cannot read {url}: {exc}"
    started_at = (state or {}).get("started_at")
    elapsed, rates = window.rates(now) if metrics["ok"] else (0.0, {})
    metrics["window_seconds"] = round(elapsed, 3)

    apps = []
    for name, st in sorted(((state or {}).get("apps") or {}).items(),
                           key=lambda kv: (kv[1].get("prefix") or "", kv[0])):
        row: dict[str, Any] = {"name": name}
        row.update({k: st.get(k) for k in APP_FIELDS})
        sample = scraped.get(name)
        row["requests_total"] = None if sample is None else sample.requests
        row["errors_total"] = None if sample is None else sample.errors
        row["in_flight"] = None if sample is None else sample.in_flight
        row["rss_bytes"] = None if sample is None else sample.rss_bytes
        row["window"] = rates.get(name)
        apps.append(row)

    supervisor = None
    if state is not None:
        pid = state.get("supervisor_pid")
        supervisor = {
            "pid": pid,
            "running": pid_alive(pid),
            "config_path": state.get("config_path"),
            "listen": state.get("listen"),
            "started_at": started_at,
            "uptime_s": (now - started_at) if isinstance(started_at, (int, float)) else None,
            "updated_at": state.get("updated_at"),
            "nginx": state.get("nginx"),
            "last_reload": state.get("last_reload"),
            "reloads": state.get("reloads"),
        }
    return {
        "generated_at": now,
        "runtime_dir": rdir,
        "state_error": state_error,
        "supervisor": supervisor,
        "metrics": metrics,
        "apps": apps,
    }
