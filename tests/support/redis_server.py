"""A real, throwaway redis-server for tests: `redis_server = redis_server_fixture()`.

The server listens on a free loopback port with its files in a temporary directory and
no persistence, and is stopped when the fixture's scope ends. Without redis-server (or
the `redis` client) the tests skip, except under CI (the `CI` variable set), where a
missing dependency must fail loudly instead of passing as a skip.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .ports import free_port

STARTUP_SECONDS = 10


class RedisServer:
    """A running redis-server: `url`, `port`, `client()`, `stop()`."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.workdir = workdir
        self.port, self.proc = self._start(binary)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _start(self, binary: str) -> tuple[int, subprocess.Popen]:
        # A free port can be taken between our probe and redis binding it: retry then.
        for _ in range(5):
            port = free_port()
            with open(self.workdir / f"redis-{port}.log", "wb") as log:
                proc = subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.workdir)],
                    stdout=log, stderr=subprocess.STDOUT)
            if _wait_for_pong(port, proc):
                return port, proc
            proc.kill()
            proc.wait()
        raise RuntimeError(f"redis-server did not start; see logs in {self.workdir}")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_for_pong(port: int, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)")
    pytest.skip(reason)


def redis_server_fixture(scope: str = "module") -> Callable[..., Iterator[RedisServer]]:
    """A pytest fixture starting one RedisServer per `scope`; assign it in a test module."""

    @pytest.fixture(scope=scope)
    def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if binary is None:
            _missing("redis-server is not installed")
        try:
            import redis  # noqa: F401
        except ImportError:
            _missing("the redis client package is not installed (pip install redis)")
        server = RedisServer(binary, tmp_path_factory.mktemp("redis"))  # type: ignore[arg-type]
        try:
            yield server
        finally:
            server.stop()

    return redis_server
