"""The app that test_sessions/test_static run under a real gunicorn.

Configured from the environment because gunicorn imports it in its own processes:
HOSTSVC_TEST_SESSIONS (JSON of tools.sessions settings) and HOSTSVC_TEST_STATIC_DIR.
"""
from __future__ import annotations

import json
import os

from hostsvc import web


class Root:
    @web.expose
    def incr(self) -> str:
        web.response.headers["X-Worker-Pid"] = str(os.getpid())
        web.session["n"] = web.session.get("n", 0) + 1
        return str(web.session["n"])


_sessions = {f"tools.sessions.{k}": v
             for k, v in json.loads(os.environ.get("HOSTSVC_TEST_SESSIONS", "{}")).items()}
application = web.Application(Root(), "", {
    "/": {"tools.sessions.on": bool(_sessions), **_sessions},
    "/static": {"tools.staticdir.on": "HOSTSVC_TEST_STATIC_DIR" in os.environ,
                "tools.staticdir.dir": os.environ.get("HOSTSVC_TEST_STATIC_DIR", "/nonexistent")},
})
