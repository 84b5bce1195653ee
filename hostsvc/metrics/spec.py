"""The one table of every metric hostsvc exports, and the lazily built multiprocess metrics.

Why a table: the metric objects (written by workers, arbiters and the supervisor), the
supervisor's scrape-time collector, docs/metrics.md and the alert/dashboard check all
need the same names, types and labels. Declaring them once here means a renamed metric
cannot silently leave a dashboard or an alert pointing at nothing (tests compare the
deploy/ files against `exported_names()`).

prometheus_client is imported only inside `mp_metrics()`: its value class (in-memory or
mmap file) is chosen once, at import, from PROMETHEUS_MULTIPROC_DIR, so the supervisor
must set that variable (prepare_multiproc_dir) before anything imports the library.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

# Web latencies: 1 ms (a cached page) to 30 s (near gunicorn's default timeout).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)
# Time between nginx accepting a request and a worker picking it up.
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0)
SIZE_BUCKETS = (100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0, 10_000_000.0,
                100_000_000.0)


@dataclass(frozen=True)
class Spec:
    """One metric family: `source` says which process writes it (see docs/metrics.md)."""

    name: str
    kind: str                      # counter | gauge | histogram | untyped
    labels: tuple[str, ...]
    help: str
    source: str                    # worker | arbiter | supervisor | scrape | nginx
    buckets: tuple[float, ...] = ()
    gauge_mode: str = ""           # multiprocess_mode for gauges written by workers


SPECS: tuple[Spec, ...] = (
    # -- written by gunicorn workers (instrument()) -----------------------------------------
    Spec("hostsvc_http_requests_total", "counter", ("app", "method", "code", "code_class"),
         "Requests answered, by app, method, status code and class (2xx...); includes "
         "502/503/504 answered by nginx for a pool that is down.", "worker"),
    Spec("hostsvc_http_request_duration_seconds", "histogram", ("app", "method"),
         "Time from the worker picking a request up to the end of its response body.",
         "worker", DURATION_BUCKETS),
    Spec("hostsvc_http_requests_in_flight", "gauge", ("app",),
         "Requests being handled by the app's live workers.", "worker",
         gauge_mode="livesum"),
    Spec("hostsvc_http_request_queue_seconds", "histogram", ("app",),
         "Time from nginx accepting a request (X-Request-Start) to a worker picking it up.",
         "worker", QUEUE_BUCKETS),
    Spec("hostsvc_http_response_size_bytes", "histogram", ("app",),
         "Response body size in bytes, counted as the body is sent.", "worker",
         SIZE_BUCKETS),
    # -- written by pools' main processes (worker_exited()) --------------------------------
    Spec("hostsvc_worker_restarts_total", "counter", ("app", "cause"),
         "Worker processes that exited and were replaced, by cause: crash, timeout, "
         "max_requests (gunicorn), lifetime (granian).", "arbiter"),
    # -- written by the supervisor (MetricsServer upstream-error endpoint) ------------------
    Spec("hostsvc_proxy_errors_total", "counter", ("app", "code"),
         "Errors nginx answered itself because the app's pool was down, missing or too "
         "slow (the upstream status nginx saw: 502, 503, 504).", "supervisor"),
    # -- computed by the supervisor at scrape time ----------------------------------------
    Spec("hostsvc_pool_workers", "gauge", ("app", "kind"),
         "Worker processes per pool: kind=configured (from the config) or live.", "scrape"),
    Spec("hostsvc_pool_state", "gauge", ("app", "state"),
         "1 for the pool's current state, 0 for the others.", "scrape"),
    Spec("hostsvc_app_ready", "gauge", ("app",),
         "1 when the app's pool has booted and serves, else 0.", "scrape"),
    Spec("hostsvc_pool_restarts_total", "counter", ("app",),
         "Times the supervisor restarted the app's whole pool after it died.", "scrape"),
    Spec("hostsvc_pool_memory_rss_bytes", "gauge", ("app",),
         "Resident memory summed over the pool's arbiter and live workers.", "scrape"),
    Spec("hostsvc_pool_cpu_seconds_total", "counter", ("app",),
         "CPU time (user+system) of the pool's arbiter, its live workers and its exited "
         "workers.", "scrape"),
    Spec("hostsvc_config_reloads_total", "counter", ("result",),
         "Config reloads by result: success or failure.", "scrape"),
    Spec("hostsvc_config_last_reload_success_timestamp_seconds", "gauge", (),
         "Unix time of the last successful config load (the start counts as one).",
         "scrape"),
    Spec("hostsvc_build_info", "gauge", ("version", "python", "gunicorn"),
         "Always 1; the labels name the running versions.", "scrape"),
    Spec("hostsvc_start_time_seconds", "gauge", (),
         "Unix time the supervisor started; uptime is time() - this.", "scrape"),
    # -- nginx stub_status, under nginx-prometheus-exporter's names -------------------------
    Spec("nginx_up", "gauge", (), "1 if nginx's stub_status answered this scrape.", "nginx"),
    Spec("nginx_connections_active", "gauge", (), "Open client connections.", "nginx"),
    Spec("nginx_connections_reading", "gauge", (),
         "Connections where nginx reads the request header.", "nginx"),
    Spec("nginx_connections_writing", "gauge", (),
         "Connections where nginx writes the response.", "nginx"),
    Spec("nginx_connections_waiting", "gauge", (), "Idle keep-alive connections.", "nginx"),
    # Counters by nature, but the exporter's names lack `_total`, which prometheus_client
    # (and OpenMetrics) only allow for untyped metrics: rate() works the same.
    Spec("nginx_connections_accepted", "untyped", (),
         "Accepted client connections (a counter).", "nginx"),
    Spec("nginx_connections_handled", "untyped", (),
         "Handled client connections (a counter).", "nginx"),
    Spec("nginx_http_requests_total", "counter", (), "Client requests.", "nginx"),
)
SPEC = {s.name: s for s in SPECS}


def exported_names() -> frozenset[str]:
    """Every series name a scrape can contain (with _bucket/_sum/_count for histograms)."""
    names = set()
    for s in SPECS:
        if s.kind == "histogram":
            names.update(s.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(s.name)
    return frozenset(names)


@functools.cache
def mp_metrics() -> dict[str, Any]:
    """The metric objects written from several processes, built on first use.

    Not registered in the default registry: in multiprocess mode the values live in
    files and the supervisor reads them with a MultiProcessCollector per scrape.
    """
    from prometheus_client import Counter, Gauge, Histogram

    made: dict[str, Any] = {}
    for s in SPECS:
        if s.source not in ("worker", "arbiter", "supervisor"):
            continue
        if s.kind == "counter":
            made[s.name] = Counter(s.name, s.help, s.labels, registry=None)
        elif s.kind == "histogram":
            made[s.name] = Histogram(s.name, s.help, s.labels, registry=None,
                                     buckets=s.buckets)
        else:
            made[s.name] = Gauge(s.name, s.help, s.labels, registry=None,
                                 multiprocess_mode=s.gauge_mode)
    return made
