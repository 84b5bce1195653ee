"""The status app in-process: a real state.json in a tmp runtime dir, a metrics address
where nothing listens, and the rate/quantile arithmetic on known numbers."""
from __future__ import annotations

import json
import os

import pytest

import status
from harness import free_port
from hostsvc.web.testing import Client
from status import collect

STATE = {
    "version": 1, "supervisor_pid": os.getpid(), "config_path": "/srv/hostsvc.yaml",
    "runtime_dir": "/srv/run", "listen": ["127.0.0.1:8080"], "started_at": 1000.0,
    "updated_at": 1001.0, "nginx": {"pid": None, "state": "running"}, "last_reload": None,
    "reloads": {"ok": 0, "failed": 0, "last_success": None},
    "apps": {
        "shop": {"prefix": "/shop", "hosts": [], "kind": "wsgi", "target": "shop:app",
                 "state": "backoff", "pid": None, "workers": 4, "threads": 1,
                 "worker_pids": [], "workers_alive": 0, "restarts": 3, "generation": 1,
                 "last_error": "exit status 3"},
        "api": {"prefix": "/api", "hosts": [], "kind": "root", "target": "api:Root",
                "state": "running", "pid": 1, "workers": 2, "threads": 1,
                "worker_pids": [2, 3], "workers_alive": 2, "restarts": 0, "generation": 2,
                "last_error": None},
    },
}


@pytest.fixture()
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("STATUS_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("STATUS_METRICS_URL", f"127.0.0.1:{free_port()}")   # nothing listens
    monkeypatch.setattr(status, "WINDOW", collect.Window(60))
    return Client(status.application, script_name="/status")


def test_without_metrics_the_state_is_shown_without_rates(client, tmp_path):
    (tmp_path / "state.json").write_text(json.dumps(STATE))
    r = client.get("/api/status")
    assert r.code == 200
    doc = json.loads(r.body)
    assert doc["metrics"]["ok"] is False and "Connection refused" in doc["metrics"]["error"]
    assert [a["name"] for a in doc["apps"]] == ["api", "shop"]          # by prefix
    shop = doc["apps"][1]
    assert (shop["state"], shop["workers_alive"], shop["workers"], shop["restarts"]) == \
        ("backoff", 0, 4, 3)
    assert shop["last_error"] == "exit status 3"
    assert shop["requests_total"] is None and shop["window"] is None
    assert doc["supervisor"]["running"] is True and doc["state_error"] is None


def test_without_state_json_it_says_so(client, tmp_path):
    r = client.get("/api/status")
    assert r.code == 200
    doc = json.loads(r.body)
    assert doc["apps"] == [] and doc["supervisor"] is None
    assert str(tmp_path / "state.json") in doc["state_error"]
    page = client.get("/")
    assert page.code == 200 and b'src="static/status.js"' in page.body
    assert client.get("/static/status.js").code == 200


def test_metrics_address_forms(monkeypatch):
    for raw, url in [("9100", "http://127.0.0.1:9100/metrics"),
                     ("0.0.0.0:9090", "http://127.0.0.1:9090/metrics"),
                     ("[::]:9090", "http://[::1]:9090/metrics"),
                     ("http://m:1/metrics", "http://m:1/metrics"), ("off", None)]:
        monkeypatch.setenv("STATUS_METRICS_URL", raw)
        assert collect.metrics_url({"metrics": {"url": "http://x:1/metrics"}}) == \
            (url, "STATUS_METRICS_URL")
    monkeypatch.delenv("STATUS_METRICS_URL")
    assert collect.metrics_url({"metrics": {"listen": "127.0.0.1:9191",
                                            "url": "http://127.0.0.1:9191/metrics"}}) == \
        ("http://127.0.0.1:9191/metrics", "state.json")
    assert collect.metrics_url({"metrics": {"listen": None, "url": None}}) == \
        (None, "state.json")
    assert collect.metrics_url({}) == ("http://127.0.0.1:9090/metrics", "default")


def test_quantile_interpolates_like_histogram_quantile():
    inf = float("inf")
    # 10 observations: 4 <= 1 ms, 9 <= 5 ms, 10 <= 10 ms
    buckets = {0.001: 4, 0.005: 9, 0.01: 10, inf: 10}
    assert collect.quantile(0.5, buckets) == pytest.approx(0.001 + 0.004 * (5 - 4) / 5)
    assert collect.quantile(0.95, buckets) == pytest.approx(0.005 + 0.005 * 0.5)
    assert collect.quantile(0.5, {0.001: 0, inf: 0}) is None
    assert collect.quantile(0.99, {0.001: 0, 0.01: 1, inf: 3}) == 0.01   # in +Inf


def test_window_rates_and_restart():
    w = collect.Window(seconds=60)
    inf = float("inf")
    w.add(100.0, 1.0, {"a": collect.AppSample(requests=10, errors=1,
                                              buckets={0.01: 10, inf: 10})})
    assert w.rates(100.0) == (0.0, {})
    w.add(110.0, 1.0, {"a": collect.AppSample(requests=30, errors=6, duration_sum=0.2,
                                              duration_count=20,
                                              buckets={0.01: 30, inf: 30})})
    elapsed, rates = w.rates(110.0)
    assert elapsed == 10.0
    assert rates["a"]["rate_per_s"] == 2.0 and rates["a"]["error_ratio"] == 0.25
    assert rates["a"]["latency_mean_ms"] == pytest.approx(10.0)
    w.add(200.0, 1.0, {"a": collect.AppSample(requests=40)})     # the first sample ages out
    assert w.rates(200.0)[0] == 90.0
    w.add(210.0, 2.0, {"a": collect.AppSample(requests=1)})      # supervisor restarted
    assert w.rates(210.0) == (0.0, {})
