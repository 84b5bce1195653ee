"""Loopback ports for servers that tests start."""
from __future__ import annotations

import socket
import time
from typing import Callable


def free_port() -> int:
    """A port nothing listens on right now (another process may still take it first)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, seconds: float, alive: Callable[[], bool]) -> bool:
    """Whether something accepts connections on `port` within `seconds`, while `alive()`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False
