"""Metrics end to end (issue #4): real traffic through `hostsvc run` (nginx + gunicorn),
then the supervisor's /metrics read with prometheus_client's own parsers.

Counts are compared exactly with the requests sent; nothing else talks to these
services. Each service gets its own metrics port ($HOSTSVC_METRICS_LISTEN, harness.py).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter as Tally
from typing import Any

import pytest

from harness import wait_for

from hostsvc.metrics.wsgi import FLUSH_INTERVAL

APPS = """
    listen: 127.0.0.1:{port}
    python_path: [{apps}]
    grace_period: 5
    apps:
      - name: echo
        wsgi: echo:app
        env: {GREETING: %s}
        graceful_timeout: 3
      - name: codes
        wsgi: codes:app
        workers: 1
        graceful_timeout: 3
      - name: hello
        root: tree:Root
        workers: 1
        graceful_timeout: 3
"""

DOWN = """
    listen: 127.0.0.1:{port}
    python_path: [{apps}]
    grace_period: 5
    metrics:
      listen: 127.0.0.1:{metrics_port}
      expose_on_main: true
      allow: [127.0.0.1]
    apps:
      - name: echo
        wsgi: echo:app
        workers: 1
        metrics: false
        graceful_timeout: 3
      - name: nostart
        wsgi: nostart:app
        workers: 1
"""


def _parsers() -> tuple[Any, Any]:
    """prometheus_client's text and OpenMetrics parsers, imported only when a test
    runs: the library picks its value class at import, and tests/test_metrics.py (in
    the same pytest process) needs it in multiprocess mode, so a first import happens
    with PROMETHEUS_MULTIPROC_DIR pointing at a throwaway dir (restored after, so no
    hostsvc started here inherits it)."""
    if "prometheus_client" not in sys.modules:
        previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        throwaway = tempfile.mkdtemp(prefix="hostsvc-e2e-")
        atexit.register(shutil.rmtree, throwaway, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = throwaway
        try:
            import prometheus_client  # noqa: F401
        finally:
            if previous is None:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
    from prometheus_client.parser import text_string_to_metric_families as text
    return text, om


def samples(text: str, openmetrics: bool = False) -> dict[str, list[Any]]:
    """{sample name: [Sample, ...]} of one scrape, parsed by prometheus_client."""
    parse = _parsers()[1 if openmetrics else 0]
    out: dict[str, list[Any]] = {}
    for family in parse(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def scrape(svc: Any) -> dict[str, list[Any]]:
    status, headers, body = svc.metrics_request("/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return samples(body.decode())


def scrape_when(svc: Any, check: Any, what: str) -> dict[str, list[Any]]:
    """The first scrape for which `check(samples)` holds: workers write their requests
    in batches, up to FLUSH_INTERVAL after they end (hostsvc/metrics/wsgi.py)."""
    return wait_for(lambda: (lambda f: f if check(f) else None)(scrape(svc)), what=what)


def value(found: dict[str, list[Any]], name: str, **labels: str) -> float | None:
    """The sample `name` with exactly these labels (a subset match), None if absent;
    summed if several match."""
    hits = [s.value for s in found.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(hits) if hits else None


def request_counts(found: dict[str, list[Any]]) -> dict[tuple[str, str, str], float]:
    return {(s.labels["app"], s.labels["method"], s.labels["code"]): s.value
            for s in found.get("hostsvc_http_requests_total", []) if s.value}


def test_requests_queue_time_worker_crash_reloads_and_openmetrics(hostsvc) -> None:
    svc = hostsvc(APPS % "hello")
    assert svc.metrics_request("/healthz")[0] == 200
    status, _, body = svc.metrics_request("/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "not_ready": []}

    # 1. traffic: several apps, methods and codes (a 404 from the prefix wrapper and the
    #    object tree, a 500 from an exception)
    sent: Tally[tuple[str, str, str]] = Tally()
    plan = [("/echo/", "GET", "echo", 200)] * 5 + [("/echo/x", "POST", "echo", 200)] * 2 + \
        [("/codes/ok", "GET", "codes", 200)] * 3 + \
        [("/codes/missing", "GET", "codes", 404)] * 2 + \
        [("/codes/boom", "GET", "codes", 500)] + \
        [("/codes/status/418", "DELETE", "codes", 418)] + \
        [("/hello/item/1", "GET", "hello", 200)] * 2 + \
        [("/hello/nope", "GET", "hello", 404)]
    for path, method, app, code in plan:
        got = svc.request(path, method=method, body=b"x" * 10 if method == "POST" else None)
        assert got[0] == code, (path, got)
        sent[(app, method, str(code))] += 1
    scrape_when(svc, lambda f: request_counts(f) == dict(sent), "the requests to be written")
    time.sleep(2 * FLUSH_INTERVAL)      # anything a worker still held would be written now
    found = scrape(svc)
    assert request_counts(found) == dict(sent)
    assert value(found, "hostsvc_http_requests_total", app="codes", code="500",
                 code_class="5xx") == 1
    for app in ("echo", "codes", "hello"):
        n = sum(v for (a, _, _), v in sent.items() if a == app)
        # every request came through nginx, which sets X-Request-Start
        assert value(found, "hostsvc_http_request_queue_seconds_count", app=app) == n
        assert value(found, "hostsvc_http_request_duration_seconds_count", app=app) == n
        assert value(found, "hostsvc_http_response_size_bytes_count", app=app) == n
        assert value(found, "hostsvc_http_requests_in_flight", app=app) == 0
        assert value(found, "hostsvc_pool_state", app=app, state="running") == 1
        assert value(found, "hostsvc_app_ready", app=app) == 1
    assert value(found, "hostsvc_pool_workers", app="echo", kind="configured") == 2
    assert value(found, "hostsvc_pool_workers", app="echo", kind="live") == 2
    assert value(found, "hostsvc_pool_memory_rss_bytes", app="echo") > 0
    assert value(found, "hostsvc_pool_cpu_seconds_total", app="echo") > 0
    # nginx's stub_status, through its loopback server
    assert value(found, "nginx_up") == 1
    assert value(found, "nginx_connections_active") >= 1
    assert value(found, "nginx_http_requests_total") >= len(plan)
    assert value(found, "hostsvc_config_reloads_total", result="success") == 0

    # `hostsvc status` reads the counts from the listener state.json names
    assert svc.state()["metrics"]["url"] == f"http://127.0.0.1:{svc.metrics_port}/metrics"
    out = subprocess.run([sys.executable, "-m", "hostsvc", "status", "--runtime-dir",
                          str(svc.runtime_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == \
        "requests since start: codes 7 (1 5xx), echo 7 (0 5xx), hello 3 (0 5xx)"

    # 2. OpenMetrics when the scraper asks for it
    status, headers, body = svc.metrics_request(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    om = samples(body.decode(), openmetrics=True)
    assert value(om, "hostsvc_http_requests_total", app="echo", method="GET", code="200") == 5

    # 3. a worker SIGKILLed: a crash restart, and no counter goes backwards
    before = svc.state()["apps"]["echo"]["worker_pids"]
    os.kill(before[0], signal.SIGKILL)
    wait_for(lambda: value(scrape(svc), "hostsvc_worker_restarts_total", app="echo",
                           cause="crash") == 1, what="the crash restart to be counted")
    wait_for(lambda: len(set(svc.state()["apps"]["echo"]["worker_pids"]) - set(before)) == 1,
             what="the replacement worker")
    svc.remember_pids()
    found = scrape(svc)
    assert request_counts(found) == dict(sent)
    assert value(found, "hostsvc_pool_restarts_total", app="echo") == 0   # the pool lived
    for _ in range(4):        # both workers, the new one included, keep counting
        assert svc.request("/echo/")[0] == 200
    sent[("echo", "GET", "200")] += 4
    scrape_when(svc, lambda f: request_counts(f) == dict(sent), "the new worker's requests")

    # 4. a good reload (echo replaced blue/green: its old pool's totals stay), then a bad one
    svc.write_config(APPS % "hola")
    os.kill(svc.proc.pid, signal.SIGHUP)
    wait_for(lambda: (svc.state().get("reloads") or {}).get("ok") == 1, what="the reload")
    assert svc.get_json("/echo/")["greeting"] == "hola"
    sent[("echo", "GET", "200")] += 1
    svc.remember_pids()
    scrape_when(svc, lambda f: value(f, "hostsvc_config_reloads_total", result="success") == 1
                and request_counts(f) == dict(sent),
                "the successful reload and the new pool's request to be counted")
    svc.write_config(APPS.replace("workers: 1", "workers: none", 1) % "hola")
    os.kill(svc.proc.pid, signal.SIGHUP)
    wait_for(lambda: (svc.state().get("reloads") or {}).get("failed") == 1,
             what="the failed reload")
    found = scrape(svc)
    assert value(found, "hostsvc_config_reloads_total", result="failure") == 1
    assert value(found, "hostsvc_config_reloads_total", result="success") == 1
    assert value(found, "hostsvc_config_last_reload_success_timestamp_seconds") == \
        pytest.approx(svc.state()["reloads"]["last_success"])
    assert request_counts(found) == dict(sent)


def test_a_dead_pool_is_counted_fails_readiness_and_main_listener_metrics(hostsvc) -> None:
    svc = hostsvc(DOWN)
    wait_for(lambda: svc.state()["apps"]["nostart"]["state"] in ("backoff", "crashloop"),
             what="nostart to fail")
    assert svc.metrics_request("/healthz")[0] == 200
    status, _, body = svc.metrics_request("/readyz")
    assert status == 503 and json.loads(body) == {"ready": False, "not_ready": ["nostart"]}

    # requests to the dead pool: still a clear 503 to the client, counted under the app
    for method in ("GET", "GET", "GET", "POST"):
        status, headers, body = svc.request("/nostart/page", method=method,
                                            body=b"data" if method == "POST" else None)
        assert status == 503 and b"not running" in body and headers["retry-after"] == "5"
    assert svc.get_json("/echo/")["app"] == "echo"
    found = scrape(svc)
    assert value(found, "hostsvc_proxy_errors_total", app="nostart", code="502") == 4
    assert value(found, "hostsvc_http_requests_total", app="nostart", method="GET",
                 code="503", code_class="5xx") == 3
    assert value(found, "hostsvc_http_requests_total", app="nostart", method="POST",
                 code="503") == 1
    # only nginx (which has the per-run token) can report upstream errors: a request
    # straight to the metrics listener is refused and counts nothing
    assert svc.metrics_request("/_hostsvc/upstream-error/nostart/502")[0] == 403
    assert value(scrape(svc), "hostsvc_proxy_errors_total", app="nostart", code="502") == 4
    assert stat.S_IMODE((svc.runtime_dir / "nginx.conf").stat().st_mode) == 0o600
    assert value(found, "hostsvc_app_ready", app="nostart") == 0
    assert value(found, "hostsvc_pool_state", app="nostart", state="running") == 0
    assert (value(found, "hostsvc_pool_state", app="nostart", state="backoff") or 0) + \
        (value(found, "hostsvc_pool_state", app="nostart", state="crashloop") or 0) + \
        (value(found, "hostsvc_pool_state", app="nostart", state="starting") or 0) == 1
    # echo has request metrics off (metrics: false): served, not counted; its pool is
    assert value(found, "hostsvc_http_requests_total", app="echo") is None
    assert value(found, "hostsvc_pool_state", app="echo", state="running") == 1
    wait_for(lambda: value(scrape(svc), "hostsvc_pool_restarts_total", app="nostart") >= 1,
             what="a pool restart to be counted")

    # expose_on_main: the same endpoints through nginx on the main listener
    status, headers, body = svc.request("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert value(samples(body.decode()), "hostsvc_proxy_errors_total", app="nostart") == 4
    assert svc.request("/healthz")[0] == 200
    status, _, body = svc.request("/readyz")
    assert status == 503 and json.loads(body)["not_ready"] == ["nostart"]
    conf = (svc.runtime_dir / "nginx.conf").read_text()
    assert "location = /metrics {" in conf and "allow 127.0.0.1;" in conf
    assert "stub_status;" in conf

    # the allow list applies on the main listener (a reload changes it); the metrics
    # listener itself is not affected
    svc.write_config(DOWN.replace("allow: [127.0.0.1]", "allow: [10.0.0.0/8]"))
    os.kill(svc.proc.pid, signal.SIGHUP)
    last = wait_for(lambda: svc.state()["last_reload"], what="the reload")
    assert last["ok"] is True, last
    assert svc.request("/metrics")[0] == 403
    assert svc.metrics_request("/metrics")[0] == 200


def test_metrics_off_keeps_nginx_own_503_and_serves_no_metrics(hostsvc) -> None:
    svc = hostsvc("""
        listen: 127.0.0.1:{port}
        python_path: [{apps}]
        grace_period: 5
        metrics: off
        apps:
          - name: echo
            wsgi: echo:app
            workers: 1
          - name: nostart
            wsgi: nostart:app
            workers: 1
    """)
    status, headers, body = svc.request("/nostart/")
    assert status == 503 and b"not running" in body and headers["retry-after"] == "5"
    assert svc.get_json("/echo/")["app"] == "echo"
    with pytest.raises(ConnectionRefusedError):
        svc.metrics_request("/healthz")
    conf = (svc.runtime_dir / "nginx.conf").read_text()
    assert "error_page 502 =503 @hostsvc_unavailable;" in conf
    assert "upstream-error" not in conf and "stub_status" not in conf
    assert not (svc.runtime_dir / "metrics").exists()
    assert svc.request("/metrics")[0] == 404


def test_a_metrics_port_in_use_leaves_the_apps_serving_without_metrics(hostsvc) -> None:
    import socket

    with socket.socket() as busy:              # someone else holds the metrics port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc = hostsvc("""
            listen: 127.0.0.1:{port}
            python_path: [{apps}]
            grace_period: 5
            metrics:
              listen: 127.0.0.1:%d
            apps:
              - name: echo
                wsgi: echo:app
                workers: 1
        """ % port)
        assert svc.get_json("/echo/")["app"] == "echo"
        assert "Address already in use; running WITHOUT metrics" in svc.stderr()
        assert svc.state()["metrics"] == {"listen": None, "url": None}
        conf = (svc.runtime_dir / "nginx.conf").read_text()
        assert "error_page 502 =503 @hostsvc_unavailable;" in conf
