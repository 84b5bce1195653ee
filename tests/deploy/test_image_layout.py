"""The image's entrypoint, run here as the image runs it, without building the image.

The Dockerfile's final-stage ENV, ENTRYPOINT (tini -> hostsvc-entrypoint) and CMD are read
from the Dockerfile itself; every image path is mapped to a directory of this test laid out
like the image (config dir, bundled apps, /srv/apps, runtime dir as the working dir); only
HOSTSVC_LISTEN is changed, to a loopback port. Then the bundled apps must answer over HTTP,
nothing may be written outside the runtime dir (the image's root filesystem is read-only),
and SIGTERM to tini must stop everything with exit 0.

It runs as the invoking user: the .venv's interpreter lives under a root-only home here, so
uid 10001 could not start it. tests/container/test_image.py runs the real image as 10001.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from support.dockerfile import final_stage
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def image_runtime() -> tuple[dict[str, str], list[str], str]:
    """(ENV, ENTRYPOINT + CMD, WORKDIR) of the final stage, as the image has them."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    argv: list[str] = []
    cmd: list[str] = []
    workdir = "/"
    import json
    for ins, args in final_stage():
        if ins == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value.replace("$PATH", env.get("PATH", ""))
        elif ins == "ENTRYPOINT":
            argv = json.loads(args)
        elif ins == "CMD":
            cmd = json.loads(args)
        elif ins == "WORKDIR":
            workdir = args
    return env, argv + cmd, workdir


def snapshot(*roots: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for r in roots for p in r.rglob("*")}


class Layout:
    """The image's directories, here."""

    def __init__(self, base: Path, tools: Any) -> None:
        self.base = base
        self.etc = base / "etc-hostsvc"                 # /etc/hostsvc
        self.examples = base / "usr-share-hostsvc-apps"  # /usr/share/hostsvc/apps
        self.srv_apps = base / "srv-apps"               # /srv/apps
        self.run = base / "run-hostsvc"                 # /run/hostsvc (WORKDIR)
        self.bin = base / "usr-local-bin"               # /usr/local/bin (the two scripts)
        self.data = base / "var-lib-hostsvc"            # /var/lib/hostsvc (example apps' data)
        for d in (self.etc, self.srv_apps, self.run, self.bin, self.data):
            d.mkdir()
        shutil.copytree(REPO / "apps", self.examples,
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "deploy" / "container" / "hostsvc.yaml", self.etc / "hostsvc.yaml")
        (self.bin / "hostsvc-entrypoint").symlink_to(REPO / "deploy" / "container" / "entrypoint.sh")
        (self.bin / "hostsvc-healthcheck").symlink_to(REPO / "deploy" / "container" / "healthcheck.py")
        self.tini = tools.tini
        self.port = free_port()
        self.metrics_port = free_port()

    def mapping(self) -> dict[str, str]:
        return {"/etc/hostsvc": str(self.etc), "/usr/share/hostsvc/apps": str(self.examples),
                "/srv/apps": str(self.srv_apps), "/run/hostsvc": str(self.run),
                "/var/lib/hostsvc": str(self.data),
                "/opt/hostsvc/bin": str(REPO / ".venv" / "bin"), "/usr/local/bin": str(self.bin),
                "/usr/bin/tini": self.tini}

    def translate(self, value: str) -> str:
        for image_path, here in sorted(self.mapping().items(), key=lambda kv: -len(kv[0])):
            value = value.replace(image_path, here)
        return value

    def command(self) -> tuple[list[str], dict[str, str], str]:
        env, argv, workdir = image_runtime()
        env = {k: self.translate(v) for k, v in env.items()}
        env["HOSTSVC_LISTEN"] = f"127.0.0.1:{self.port}"      # loopback only, a free port
        env["HOSTSVC_METRICS_LISTEN"] = f"127.0.0.1:{self.metrics_port}"
        return [self.translate(a) for a in argv], env, self.translate(workdir)


@contextmanager
def running(layout: Layout) -> Iterator[subprocess.Popen[str]]:
    argv, env, cwd = layout.command()
    # tini is not PID 1 here: as a subreaper it still adopts and reaps orphans as in the image.
    env["TINI_SUBREAPER"] = "1"
    # Files, not pipes: nginx and the pools inherit the descriptors (logs go to stdout/stderr).
    with open(layout.base / "stdout", "w") as out, open(layout.base / "stderr", "w") as err:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
    proc.log = layout.base / "stderr"  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{layout.port}/", timeout=2)
                break
            except urllib.error.HTTPError as exc:
                exc.close()
                break          # nginx answers (404 at /): the apps are up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    pytest.fail(f"the entrypoint did not start serving (exit {proc.returncode}):\n"
                                + proc.log.read_text())  # type: ignore[attr-defined]
                time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get(layout: Layout, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{layout.port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)        # what `docker stop` sends to PID 1 (tini)
    proc.wait(timeout=90)
    return proc.returncode, proc.log.read_text()  # type: ignore[attr-defined]


@pytest.fixture
def layout(tmp_path: Path, tools: Any) -> Layout:
    return Layout(tmp_path, tools)


def test_image_entrypoint_serves_the_bundled_apps_and_writes_only_its_runtime_dir(layout: Layout) -> None:
    argv, env, cwd = layout.command()
    assert argv == [layout.tini, "--", "hostsvc-entrypoint"]   # found on PATH, as in the image
    assert env["PATH"].split(":")[:3] == [str(REPO / ".venv" / "bin"), "/usr/local/sbin", str(layout.bin)]
    assert cwd == str(layout.run)
    before = snapshot(layout.etc, layout.examples, layout.srv_apps)
    with running(layout) as proc:
        assert get(layout, "/hello/") == (200, "Hello from hostsvc! You are 127.0.0.1.\n")
        status, body = get(layout, "/plain/x")
        assert status == 200 and "greeting=hello from the container" in body
        status, body = get(layout, "/static/index.html")
        assert status == 200 and "<" in body
        # notes keeps its SQLite file in the data dir (HOSTSVC_DATA_DIR, a volume in the image)
        req = urllib.request.Request(f"http://127.0.0.1:{layout.port}/notes/notes/", method="POST",
                                     data=b'{"title": "t", "body": "b"}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
        assert (layout.data / "notes.sqlite3").exists()
        # The supervisor runs the image's config from the config dir, in the runtime dir.
        assert (layout.run / "nginx.conf").exists() and (layout.run / "sockets").is_dir()
        state = layout.run / "state.json"          # written on the supervisor's next tick
        deadline = time.monotonic() + 30
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert str(layout.etc / "hostsvc.yaml") in state.read_text()
        code, err = stop(proc)
    assert code == 0, err
    assert "stopping: draining" in err and "stopped" in err
    assert snapshot(layout.etc, layout.examples, layout.srv_apps) == before, \
        "something was written outside the runtime dir (the image's root filesystem is read-only)"


def test_a_mounted_config_and_an_app_in_srv_apps(layout: Layout) -> None:
    """`-v config:/etc/hostsvc -v apps:/srv/apps`: /srv/apps is on the import path (PYTHONPATH)."""
    (layout.srv_apps / "myapp.py").write_text(
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'my app at ' + environ['SCRIPT_NAME'].encode()]\n")
    (layout.etc / "hostsvc.yaml").write_text(
        "listen: ${HOSTSVC_LISTEN:-0.0.0.0:8080}\n"
        "apps:\n"
        "  - name: mine\n"
        "    wsgi: myapp:app\n"
        "    workers: 1\n")
    with running(layout) as proc:
        assert get(layout, "/mine/") == (200, "my app at /mine")
        assert get(layout, "/hello/")[0] == 404
        code, err = stop(proc)
    assert code == 0, err
    # The runtime dir came from HOSTSVC_RUNTIME_DIR (the entrypoint's --runtime-dir), though
    # this config names none: its default (./run) would be on the read-only root otherwise.
    assert not (layout.run / "run").exists()


def test_a_bad_config_exits_at_once_naming_file_and_line(layout: Layout) -> None:
    (layout.etc / "hostsvc.yaml").write_text("listen: ${HOSTSVC_LISTEN}\napps:\n  - name: x\n    wsgi: nope\n")
    argv, env, cwd = layout.command()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"{layout.etc / 'hostsvc.yaml'}:4: apps[0].wsgi: expected 'package.module:attribute'" in proc.stderr


def test_container_config_serves_what_the_dev_config_serves() -> None:
    """deploy/container/hostsvc.yaml and config/hostsvc.yaml mount the same apps and statics."""
    from hostsvc import config as configmod
    env = {**os.environ, "HOSTSVC_EXAMPLES": str(REPO / "apps")}
    dev = configmod.load(REPO / "config" / "hostsvc.yaml", environ=env)
    box = configmod.load(REPO / "deploy" / "container" / "hostsvc.yaml", environ=env)
    assert [(a.name, a.prefix, a.kind, a.target) for a in box.apps] == \
        [(a.name, a.prefix, a.kind, a.target) for a in dev.apps], \
        "an example app was added to config/hostsvc.yaml: add it to deploy/container/hostsvc.yaml too"
    assert [(s.prefix, s.path) for s in box.static] == [(s.prefix, s.path) for s in dev.static]
    # and the container listens on every interface unless told otherwise
    assert configmod.load(REPO / "deploy" / "container" / "hostsvc.yaml",
                          environ={"HOSTSVC_EXAMPLES": str(REPO / "apps")}).listen == ["0.0.0.0:8080"]


def test_healthcheck_script_fails_without_a_server(layout: Layout) -> None:
    _, env, _ = layout.command()
    proc = subprocess.run([str(layout.bin / "hostsvc-healthcheck")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert f"http://127.0.0.1:{layout.metrics_port}/healthz" in proc.stderr
