"""Issue #8: the image built and run for real with podman (tests/container/).

Builds the Dockerfile (podman, against the stand-in python:3.11-slim that
../shared/tools/container-env.sh makes), then runs it with --network host, bound to loopback
ports, as uid 10001 on a read-only root filesystem with no tmpfs at all (the image's volumes
are the only writable places), and checks what issue #8 lists. Every container and the image
are removed at the end. Without podman this module skips on a developer machine and fails
under CI (CI set).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CONTAINER_ENV = REPO.parent / "shared" / "tools" / "container-env.sh"
CA = "/etc/ssl/certs/ca-certificates.crt"
TAG = f"localhost/hostsvc-test:{os.getpid()}"


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the container tests must run here)")
    pytest.skip(reason)


class Podman:
    def __init__(self, conf: str) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": conf}
        self.containers: list[str] = []

    def __call__(self, *args: str, timeout: float = 120, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    if not CONTAINER_ENV.exists():
        unavailable(f"{CONTAINER_ENV} is missing")
    try:
        proc = subprocess.run(["bash", str(CONTAINER_ENV)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        unavailable("container-env.sh did not finish in 15 minutes")
    if proc.returncode != 0:
        unavailable(f"container-env.sh failed: {proc.stderr[-2000:]}")
    p = Podman(proc.stdout.strip().splitlines()[-1])
    if p("info", check=False).returncode != 0:
        unavailable("podman info fails here")
    yield p
    for name in p.containers:
        p("rm", "-f", "-v", name, check=False)


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    podman("build", "--format", "docker", "--pull=never", "-v", f"{CA}:{CA}:ro", "-t", TAG,
           str(REPO), timeout=900)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", TAG).stdout.strip())
    print(f"\nimage {TAG}: {size / 1e6:.0f} MB (on the stand-in python:3.11-slim base)", file=sys.stderr)
    yield TAG
    podman("rmi", "-f", TAG, check=False)


def http(port: int, path: str, data: bytes | None = None, timeout: float = 10) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


class Box:
    """One running container."""

    def __init__(self, podman: Podman, image: str, *run_args: str) -> None:
        self.podman = podman
        self.port, self.metrics_port = free_port(), free_port()
        self.name = f"hostsvc-test-{os.getpid()}-{len(podman.containers)}"
        podman.containers.append(self.name)
        podman("run", "-d", "--name", self.name, "--network", "host",
               "--read-only", "--read-only-tmpfs=false",
               "-e", f"HOSTSVC_LISTEN=127.0.0.1:{self.port}",
               "-e", f"HOSTSVC_METRICS_LISTEN=127.0.0.1:{self.metrics_port}",
               *run_args, image)
        deadline = time.monotonic() + 120
        while True:
            try:
                http(self.port, "/nothing-here", timeout=2)
                return
            except OSError:
                if not self.running() or time.monotonic() > deadline:
                    pytest.fail(f"{self.name} did not start serving:\n{self.logs()}")
                time.sleep(0.2)

    def running(self) -> bool:
        out = self.podman("inspect", "--format", "{{.State.Running}}", self.name, check=False).stdout
        return out.strip() == "true"

    def logs(self) -> str:
        proc = self.podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, *cmd, check=check)

    def processes(self) -> list[dict[str, Any]]:
        script = ("import os, json\nout = []\nfor p in os.listdir('/proc'):\n"
                  "    if p.isdigit():\n        try:\n"
                  "            stat = open(f'/proc/{p}/stat').read()\n"
                  "            cmd = open(f'/proc/{p}/cmdline').read().replace(chr(0), ' ').strip()\n"
                  "        except OSError:\n            continue\n"
                  "        rest = stat.rsplit(')', 1)[1].split()\n"
                  "        out.append({'pid': int(p), 'state': rest[0], 'ppid': int(rest[1]),"
                  " 'comm': stat.split('(', 1)[1].rsplit(')', 1)[0], 'cmd': cmd})\n"
                  "print(json.dumps(out))")
        return json.loads(self.exec("python", "-c", script).stdout)


@pytest.fixture(scope="module")
def plain_box(podman: Podman, image: str) -> Box:
    return Box(podman, image)


def test_no_volume_serves_the_bundled_apps(plain_box: Box) -> None:
    assert http(plain_box.port, "/hello/") == (200, "Hello from hostsvc! You are 127.0.0.1.\n")
    status, body = http(plain_box.port, "/plain/x")
    assert status == 200 and "greeting=hello from the container" in body
    assert http(plain_box.port, "/static/index.html")[0] == 200
    status, _ = http(plain_box.port, "/notes/notes/", data=b'{"title": "t", "body": "b"}')
    assert status == 201, "notes writes its SQLite file into the /var/lib/hostsvc volume"
    status, body = http(plain_box.port, "/status/api/status")
    assert status == 200 and "hello" in body, "the status page reads state.json and /metrics"


def test_runs_as_non_root_on_a_read_only_root_with_tini_as_pid_1(plain_box: Box) -> None:
    assert plain_box.exec("id", "-u").stdout.strip() == "10001"
    procs = plain_box.processes()
    pid1 = next(p for p in procs if p["pid"] == 1)
    assert pid1["cmd"].startswith("/usr/bin/tini -- hostsvc-entrypoint")
    supervisor = [p for p in procs if p["ppid"] == 1 and "hostsvc run /etc/hostsvc/hostsvc.yaml" in p["cmd"]]
    assert len(supervisor) == 1, procs
    assert "--runtime-dir /run/hostsvc" in supervisor[0]["cmd"]
    assert any(p["comm"] == "nginx" for p in procs)
    for path in ("/usr/x", "/tmp/x", "/opt/hostsvc/x", "/srv/x"):
        proc = plain_box.exec("touch", path, check=False)
        assert proc.returncode != 0 and "Read-only file system" in proc.stderr, path
    assert plain_box.exec("touch", "/etc/hostsvc/x", check=False).returncode != 0  # root's volume
    plain_box.exec("touch", "/run/hostsvc/probe")


def test_metrics_healthz_readyz(plain_box: Box) -> None:
    try:
        status, _ = http(plain_box.metrics_port, "/healthz")
    except OSError:
        pytest.skip("nothing serves the metrics port: the metrics server (hostsvc/metrics) is "
                    "not wired into the supervisor yet")
    assert status == 200
    status, body = http(plain_box.metrics_port, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = http(plain_box.metrics_port, "/metrics")
    assert status == 200 and "# TYPE" in body


def test_no_zombies_orphans_are_reaped(plain_box: Box) -> None:
    # An orphan: the subshell exits at once, its `sleep` is re-parented to PID 1 (tini).
    plain_box.exec("sh", "-c", "(sleep 1 &) ; true")
    deadline = time.monotonic() + 30
    while any(p["comm"] == "sleep" for p in plain_box.processes()) and time.monotonic() < deadline:
        time.sleep(0.3)
    procs = plain_box.processes()
    assert not [p for p in procs if p["state"] == "Z"], procs
    assert not any(p["comm"] == "sleep" for p in procs), "the orphan was never reaped"


def test_healthcheck_passes_when_healthy_and_fails_when_hung(plain_box: Box) -> None:
    cfg = json.loads(plain_box.podman("image", "inspect", TAG).stdout)[0]["Healthcheck"]
    assert cfg["Test"] == ["CMD", "hostsvc-healthcheck"]
    healthy = plain_box.podman("healthcheck", "run", plain_box.name, check=False)
    try:
        http(plain_box.metrics_port, "/healthz")
    except OSError:
        # Until the metrics server is wired, /healthz does not exist: the check must say so.
        assert healthy.returncode != 0
        pytest.skip("HEALTHCHECK fails as it should while nothing serves /healthz: the metrics "
                    "server is not wired into the supervisor yet")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    supervisor = next(p for p in plain_box.processes() if "hostsvc run" in p["cmd"] and p["ppid"] == 1)
    plain_box.exec("python", "-c", f"import os, signal; os.kill({supervisor['pid']}, signal.SIGSTOP)")
    try:
        hung = plain_box.podman("healthcheck", "run", plain_box.name, check=False)
        assert hung.returncode != 0
    finally:
        plain_box.exec("python", "-c", f"import os, signal; os.kill({supervisor['pid']}, signal.SIGCONT)")


def test_stop_drains_and_exits_0(podman: Podman, image: str) -> None:
    box = Box(podman, image)
    assert http(box.port, "/hello/")[0] == 200
    podman("stop", "-t", "30", box.name, timeout=90)
    state = json.loads(podman("inspect", box.name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, box.logs()     # 137 would mean killed after the grace period
    logs = box.logs()
    assert "event=signal signal=SIGTERM" in logs and "stopping: draining" in logs
    assert "hostsvc: stopped" in logs


def _dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o755)
    return path


def test_mounted_config_and_app_folder(podman: Podman, image: str, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    config, apps = _dir(tmp_path / "config"), _dir(tmp_path / "apps")
    (apps / "myapp.py").write_text(
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'my app at ' + environ['SCRIPT_NAME'].encode()]\n")
    (config / "hostsvc.yaml").write_text(
        "listen: ${HOSTSVC_LISTEN:-0.0.0.0:8080}\n"
        "apps:\n"
        "  - name: mine            # from the /srv/apps volume (on PYTHONPATH)\n"
        "    wsgi: myapp:app\n"
        "    workers: 1\n"
        "  - name: plain\n"
        "    prefix: /p\n"
        "    wsgi: plain_wsgi:app\n"
        "    python_path: [/usr/share/hostsvc/apps]\n"
        "    env: {GREETING: from the mounted config}\n")
    for f in (apps / "myapp.py", config / "hostsvc.yaml"):
        f.chmod(0o644)
    box = Box(podman, image, "-v", f"{config}:/etc/hostsvc:ro", "-v", f"{apps}:/srv/apps:ro")
    assert http(box.port, "/mine/") == (200, "my app at /mine")
    status, body = http(box.port, "/p/")
    assert status == 200 and "greeting=from the mounted config" in body
    assert http(box.port, "/hello/")[0] == 404, "the bundled config is replaced, not merged"


def test_bad_config_exits_non_zero_at_once_with_file_and_line(podman: Podman, image: str,
                                                             tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    config = _dir(tmp_path / "config")
    (config / "hostsvc.yaml").write_text("listen: ${HOSTSVC_LISTEN}\napps:\n  - name: x\n    wsgi: nope\n")
    (config / "hostsvc.yaml").chmod(0o644)
    proc = podman("run", "--rm", "--network", "host", "--read-only", "-e", "HOSTSVC_LISTEN=127.0.0.1:1",
                  "-v", f"{config}:/etc/hostsvc:ro", image, timeout=120, check=False)
    assert proc.returncode != 0
    assert "/etc/hostsvc/hostsvc.yaml:4: apps[0].wsgi: expected 'package.module:attribute'" in proc.stderr


def test_image_size_is_reported_and_sane(podman: Podman, image: str) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    base = int(podman("image", "inspect", "--format", "{{.Size}}", "docker.io/library/python:3.11-slim").stdout.strip())
    added = size - base
    print(f"\nimage {size / 1e6:.0f} MB = base {base / 1e6:.0f} MB + hostsvc {added / 1e6:.0f} MB", file=sys.stderr)
    assert 0 < added < 150e6, "nginx, tini and the venv should add well under 150 MB"
