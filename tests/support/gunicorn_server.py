"""A real gunicorn serving a test app on loopback: `with gunicorn("mod:application", dir)`."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .ports import free_port, wait_for_port


@contextmanager
def gunicorn(app: str, chdir: Path, env: dict[str, str], workers: int = 2, threads: int = 2
             ) -> Iterator[int]:
    """Run gunicorn (gthread) until the block ends; yields its port. Several workers are
    separate processes, which is what cross-process session locking must survive."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(chdir), "--bind",
         f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads),
         "--worker-class", "gthread", "--log-level", "warning", app],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if not wait_for_port(port, 20, lambda: proc.poll() is None):
            proc.kill()
            raise RuntimeError("gunicorn did not start: " + proc.communicate()[0].decode())
        yield port
    finally:
        if proc.poll() is None:
            proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
