"""Serving through the real nginx -> gunicorn path: routing, prefixes, headers, static
files, limits, access logs, state.json and `hostsvc status`."""
from __future__ import annotations

import gzip
import http.client
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import BASIC_CONFIG, compose, wait_for

REPO = Path(__file__).resolve().parents[2]


def test_prefix_routing_script_name_and_forwarded_headers(hostsvc) -> None:
    svc = hostsvc(BASIC_CONFIG)
    doc = svc.get_json("/echo/a/b?x=1")
    assert (doc["script_name"], doc["path_info"], doc["query"]) == ("/echo", "/a/b", "x=1")
    assert doc["greeting"] == "hello" and doc["app"] == "echo"
    headers = doc["headers"]
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{svc.port}"
    assert headers["X-Request-Start"].startswith("t=")
    assert float(headers["X-Request-Start"][2:]) > 1e9      # nginx's $msec: epoch seconds

    status, h, _ = svc.request("/echo")
    assert (status, h["location"]) == (301, "/echo/")
    status, h, _ = svc.request("/echo?q=1")
    assert (status, h["location"]) == (301, "/echo/?q=1")
    assert svc.request("/nothing-here")[0] == 404
    assert svc.request("/echoes")[0] == 404                  # a prefix is a whole segment


def test_object_tree_sees_the_real_client_behind_nginx(hostsvc) -> None:
    svc = hostsvc(BASIC_CONFIG)
    status, _, body = svc.request("/hello/", headers={"X-Forwarded-For": "203.0.113.9"})
    doc = json.loads(body)
    assert status == 200
    # tools.proxy is on by default: the rightmost X-Forwarded-For entry (nginx's own) wins.
    assert doc["remote_ip"] == "127.0.0.1"
    assert doc["base"] == f"http://127.0.0.1:{svc.port}"
    assert doc["url"] == f"http://127.0.0.1:{svc.port}/hello/item/7"
    assert (doc["script_name"], doc["path_info"]) == ("/hello", "/")
    assert svc.request("/hello/item/7")[2] == b"item 7"                   # path argument
    assert svc.request("/hello/search?q=nginx")[2] == b"searching nginx"  # query argument


def test_static_mounts_body_limits_and_json_access_log(hostsvc, tmp_path: Path) -> None:
    public = tmp_path / "public"
    public.mkdir()
    (public / "style.css").write_text("body { color: red }\n")
    svc = hostsvc(compose(BASIC_CONFIG, """
        client_max_body_size: 1k
        static:
          - prefix: /assets
            path: public
            expires: 1h
    """))
    status, headers, body = svc.request("/assets/style.css")
    assert (status, body) == (200, b"body { color: red }\n")
    assert headers["content-type"].startswith("text/css")
    assert headers["cache-control"] == "max-age=3600"
    assert svc.request("/assets/missing.css")[0] == 404

    assert svc.get_json("/echo/upload?ok") is not None
    status, _, body = svc.request("/echo/upload", "POST", body=b"x" * 512)
    assert status == 200 and json.loads(body)["body_length"] == 512
    assert svc.request("/echo/upload", "POST", body=b"x" * 4096)[0] == 413

    def logged() -> list[dict]:
        return [json.loads(line) for line in svc.stdout().splitlines() if line.startswith("{")]
    entries = wait_for(lambda: [e for e in logged() if e["uri"] == "/assets/style.css"],
                       what="the access log line")
    assert entries[0]["status"] == 200 and entries[0]["method"] == "GET"
    echo = [e for e in logged() if e["uri"] == "/echo/upload?ok"]
    assert echo and echo[0]["app"] == "echo" and echo[0]["upstream_response_time"]


def test_state_json_and_status_command(hostsvc) -> None:
    svc = hostsvc(BASIC_CONFIG)
    state = wait_for(lambda: (s := svc.state()) and all(
        len(a["worker_pids"]) == a["workers"] for a in s["apps"].values()) and s,
        what="worker pids in state.json")
    assert state["version"] == 1
    assert state["supervisor_pid"] == svc.proc.pid
    assert state["config_path"] == str(svc.config_path)
    assert state["listen"] == [f"127.0.0.1:{svc.port}"]
    assert state["nginx"]["state"] == "running" and state["nginx"]["pid"]
    echo = state["apps"]["echo"]
    assert (echo["prefix"], echo["state"], echo["restarts"], echo["workers"]) == \
        ("/echo", "running", 0, 2)
    # The pids are the real processes: the worker that answers is one of them.
    answer = svc.get_json("/echo/")
    assert answer["pid"] in echo["worker_pids"] and answer["ppid"] == echo["pid"]
    assert (svc.runtime_dir / "hostsvc.pid").read_text().strip() == str(svc.proc.pid)

    out = subprocess.run([sys.executable, "-m", "hostsvc", "status", "--runtime-dir",
                          str(svc.runtime_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["APP", "PREFIX", "PID", "WORKERS", "RESTARTS", "STATE"]
    assert lines[2].split() == ["echo", "/echo", str(echo["pid"]), "2/2", "0", "running"]
    assert lines[3].split()[:2] == ["hello", "/hello"]
    assert "event=started" in svc.stderr() and f"app=echo pid={echo['pid']}" in svc.stderr()
    assert "all apps ready" in svc.stderr()


def test_virtual_hosts_and_444_for_unknown_hosts(hostsvc) -> None:
    svc = hostsvc("""
        listen: 127.0.0.1:{port}
        python_path: [{apps}]
        apps:
          - {name: one, prefix: /, hosts: [one.test], wsgi: echo:app, workers: 1}
          - {name: two, prefix: /, hosts: [two.test], wsgi: echo:app, workers: 1}
    """)
    for host in ("one", "two"):
        status, _, body = svc.request("/x", headers={"Host": f"{host}.test"})
        assert status == 200 and json.loads(body)["app"] == host
        assert json.loads(body)["script_name"] == ""      # mounted at "/"
    try:
        status = svc.request("/x", headers={"Host": "other.test"})[0]
    except http.client.RemoteDisconnected:
        status = 444                                     # nginx closed the connection
    assert status == 444


@pytest.mark.engines("gunicorn")
def test_per_path_config_and_max_requests_worker_recycling(hostsvc) -> None:
    svc = hostsvc("""
        listen: 127.0.0.1:{port}
        python_path: [{apps}]
        apps:
          - name: tree
            root: tree:Root
            config: {"/": {"tools.gzip.on": true}}
          - name: echo
            wsgi: echo:app
            workers: 1
            max_requests: 5
    """)
    # The app's YAML config reaches hostsvc.web; tools.proxy stays on next to it.
    status, headers, body = svc.request("/tree/", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(body))["base"] == f"http://127.0.0.1:{svc.port}"

    # A worker restarted by max_requests drops nothing: the next request waits for the
    # new worker in the socket's backlog.
    pids = set()
    for _ in range(18):
        status, _, body = svc.request("/echo/")
        assert status == 200, body
        pids.add(json.loads(body)["pid"])
    assert len(pids) >= 3
