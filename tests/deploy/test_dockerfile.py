"""The Dockerfile: hadolint (the real linter, offline) and the properties issue #5 asks for.

The image itself is built and run by tests/container/test_image.py (podman).
"""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from support.dockerfile import DOCKERFILE, final_stage, instructions, stages

REPO = Path(__file__).resolve().parents[2]



def test_hadolint_passes(tools: Any) -> None:
    proc = subprocess.run([str(tools.hadolint), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_really_linting(tools: Any, tmp_path: Path) -> None:
    """A Dockerfile with the classic mistakes is rejected, so a pass above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update\nRUN apt-get install nginx-light\n"
                   "RUN pip install gunicorn\nHEALTHCHECK CMD curl -f http://localhost/\n")
    proc = subprocess.run([str(tools.hadolint), "--no-color", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    for rule in ("DL3009", "DL3014", "DL3015", "DL3013"):
        assert rule in proc.stdout, proc.stdout


def test_multi_stage_venv_without_compilers_in_the_final_stage() -> None:
    text = DOCKERFILE.read_text()
    all_stages = stages(text)
    assert len(all_stages) >= 2
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim\b", text)
    assert all(s[0][1].split()[0] == "${PYTHON_IMAGE}" for s in all_stages)
    builder = " ".join(args for _, args in all_stages[0])
    assert "pip wheel" in builder and "-r requirements.lock" in builder
    final = final_stage()
    runs = " ".join(args for ins, args in final if ins == "RUN")
    assert "pip" not in runs, "the final stage installs nothing with pip: the venv is copied in"
    for compiler in ("gcc", "build-essential", "python3-dev", "make"):
        assert compiler not in runs
    assert ("COPY", "--from=builder /opt/hostsvc /opt/hostsvc") in final
    assert "--no-install-recommends nginx-light tini" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_runtime_contract() -> None:
    final = final_stage()
    by = {}
    for ins, args in final:
        by.setdefault(ins, []).append(args)
    assert by["USER"] == ["10001:10001"]
    assert by["EXPOSE"] == ["8080 9090"]
    assert by["ENTRYPOINT"] == ['["/usr/bin/tini", "--", "hostsvc-entrypoint"]']
    assert "/run/hostsvc" in by["VOLUME"][0] and "/etc/hostsvc" in by["VOLUME"][0] \
        and "/srv/apps" in by["VOLUME"][0]
    health = by["HEALTHCHECK"][0]
    assert health.endswith('CMD ["hostsvc-healthcheck"]')
    assert "curl" not in DOCKERFILE.read_text().split("HEALTHCHECK", 1)[1]
    env = " ".join(by["ENV"])
    for setting in ("HOSTSVC_CONFIG=/etc/hostsvc/hostsvc.yaml", "HOSTSVC_RUNTIME_DIR=/run/hostsvc",
                    "HOSTSVC_LISTEN=0.0.0.0:8080", "HOSTSVC_METRICS_LISTEN=0.0.0.0:9090", "PYTHONPATH=/srv/apps"):
        assert setting in env
    assert "chown 10001:10001 /run/hostsvc /var/lib/hostsvc" in " ".join(by["RUN"])


def test_lock_pins_every_dependency_exactly() -> None:
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = line.split(";", 1)[0].strip()
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", req), f"not an exact pin: {line}"
            name, version = req.split("==")
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["redis"] + extras["granian"]
    for dep in wanted:
        name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in lock, f"{name} is not in requirements.lock"


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[[i for i, l in enumerate(ignore) if not l.startswith("#")][0]] == "*"
    allowed = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    assert {"hostsvc", "pyproject.toml", "requirements.lock", "apps", "deploy/container"} <= allowed
    copied = [args.split()[-2] for ins, args in instructions(DOCKERFILE.read_text())
              if ins == "COPY" and not args.startswith("--from")]
    for src in copied:
        src = src.rstrip("/").rstrip("*")
        assert any(src == a or src.startswith(a + "/") or src.startswith(a) for a in allowed), src


@pytest.mark.parametrize("script", ["entrypoint.sh", "healthcheck.py"])
def test_container_scripts_are_executable(script: str) -> None:
    assert (REPO / "deploy" / "container" / script).stat().st_mode & 0o111
