"""The applications the framework benchmark serves, one module so every server loads the same code.

WSGI apps, each reachable by name (``APP_SPECS``):

* ``raw``: a hand-written WSGI hello, the floor: what the server costs with no framework.
* ``hostsvc``: one hostsvc.web tree with ``/`` (hello) and ``/item/<id>?q=`` (a path
  argument and a query argument), at default config, as an app author would write it.
* ``hostsvc-proxied``: that tree with ``tools.proxy.on``, as hostsvc mounts it (in-process
  timing only).
* ``cherrypy``: the same tree written for CherryPy 18, mounted with ``cherrypy.tree.mount``
  and served as WSGI, the peer hostsvc.web promises to beat.

The CherryPy app is built by a factory so that gunicorn workers serving the other apps
never import CherryPy. Run as a script, this module serves one app on CherryPy's own
server (``python bench/apps.py NAME PORT``), which is how ``bench/web.py`` starts it.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

from hostsvc import web

HELLO = b"Hello, world!"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def raw_hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """The baseline: the least a WSGI app can do to answer hello."""
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(HELLO)))])
    return [HELLO]


class HostsvcRoot:
    """(b) ``/`` and (c) ``/item/42?q=x`` as a hostsvc.web object tree."""

    @web.expose
    def index(self) -> str:
        return "Hello, world!"

    @web.expose
    def item(self, item_id: str, q: str = "") -> str:
        return f"item {item_id} q={q}"


hostsvc_app = web.Application(HostsvcRoot())
# The same tree as hostsvc mounts it: its loader turns tools.proxy on for every object
# tree (only hostsvc's nginx reaches a pool), so every request reads forwarded headers.
hostsvc_proxied_app = web.Application(HostsvcRoot(), config={"/": {"tools.proxy.on": True}})


def cherrypy_app() -> WSGIApp:
    """(d) The same tree for CherryPy, mounted as its docs say, with production settings.

    "production" turns off autoreload, the config checker and tracebacks, and screen
    logging: what a deployment would run, so CherryPy is not measured with dev overhead.
    """
    import cherrypy

    class CherryPyRoot:
        @cherrypy.expose
        def index(self) -> str:
            return "Hello, world!"

        @cherrypy.expose
        def item(self, item_id: str, q: str = "") -> str:
            return f"item {item_id} q={q}"

    cherrypy.config.update({"environment": "production", "log.screen": False,
                            "log.access_file": "", "log.error_file": ""})
    return cherrypy.tree.mount(CherryPyRoot(), "")


APP_SPECS: dict[str, str] = {
    "raw": "raw_hello",
    "hostsvc": "hostsvc_app",
    "hostsvc-proxied": "hostsvc_proxied_app",
    "cherrypy": "cherrypy_app()",
}


def load(name: str) -> WSGIApp:
    """The WSGI callable for an ``APP_SPECS`` name, as gunicorn would resolve its spec."""
    spec = APP_SPECS[name]
    if spec.endswith("()"):
        return globals()[spec[:-2]]()
    return globals()[spec]


def serve_on_cherrypy(name: str, port: int, threads: int = 10) -> None:
    """Serve one app on CherryPy's own server (cheroot) until SIGTERM.

    The CherryPy tree is mounted natively; the other apps are grafted as plain WSGI, so
    every app can be compared on this server too. Only the thread count is set; the
    rest (e.g. the listen backlog) stays at CherryPy's defaults, as users get it.
    """
    import cherrypy

    app = load(name)
    if name != "cherrypy":
        cherrypy.config.update({"environment": "production", "log.screen": False,
                                "log.access_file": "", "log.error_file": ""})
        cherrypy.tree.graft(app, "")
    cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": port,
                            "server.thread_pool": threads})
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    cherrypy.engine.block()


if __name__ == "__main__":
    serve_on_cherrypy(sys.argv[1], int(sys.argv[2]))
