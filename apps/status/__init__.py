"""status: the live status page of the host itself, mounted at /status/.

    GET /status/               the page (HTML; its script fetches the JSON every 3 s)
    GET /status/api/status     the same data as JSON
    GET /status/static/...     the page's CSS and JS (tools.staticdir)

It reads hostsvc's documented local interfaces only (see collect.py): `state.json` in the
runtime dir ($STATUS_RUNTIME_DIR, else $HOSTSVC_RUNTIME_DIR, else ./run) and the metrics
server's /metrics at state.json's `metrics.url` ($STATUS_METRICS_URL overrides it; `off`
for none). Without metrics the page shows the state and no rates; without state.json it
says so (never a 500).

`Home` is a one-page app for `/`: it redirects `/` to the status page and 404s the rest.
"""
from __future__ import annotations

import os
import time
from typing import Any

from hostsvc import web

from . import collect

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
WINDOW = collect.Window(seconds=float(os.environ.get("STATUS_WINDOW_SECONDS", "300")))


class Api:
    @web.expose
    @web.tools.json_out()
    def status(self) -> dict[str, Any]:
        web.response.headers["Cache-Control"] = "no-store"
        return collect.status(WINDOW, time.time())


class Root:
    api = Api()

    @web.expose
    def index(self) -> bytes:
        web.response.headers["Cache-Control"] = "no-cache"
        with open(os.path.join(STATIC, "index.html"), "rb") as fh:
            return fh.read()


class Home:
    """For `prefix: /`: send visitors of the bare host to the status page."""

    @web.expose
    def index(self) -> None:
        raise web.HTTPRedirect(os.environ.get("STATUS_HOME_REDIRECT", "/status/"), 302)


CONFIG = {
    "/static": {"tools.staticdir.on": True, "tools.staticdir.dir": STATIC,
                "tools.expires.on": True, "tools.expires.secs": 300},
}
application = web.Application(Root(), config=CONFIG)
home = web.Application(Home())
