"""hostsvc.web: an object-tree web framework in the CherryPy style.

    from hostsvc import web

    class Root:
        @web.expose
        def index(self):
            return "Hello"

    application = web.Application(Root())    # any WSGI server can serve this

Code written for CherryPy ports with `from hostsvc import web as cherrypy`.
"""
from __future__ import annotations

from types import SimpleNamespace

from . import dispatch
from .app import Application, Tree, tree
from .builtins import tools
from .config import config
from .context import request, response, serving, session
from .dispatch import expose, popargs
from .errors import HTTPError, HTTPRedirect, NotFound
from .forms import UploadedFile
from .tools import HandlerTool, Tool, Toolbox
from .urls import url

from . import sessions, static
from .static import serve_download, serve_file

# CherryPy's `lib` modules this framework has: `web.lib.static.serve_file(...)`,
# `web.lib.sessions.expire()`.
lib = SimpleNamespace(sessions=sessions, static=static)

__all__ = [
    "Application", "HTTPError", "HTTPRedirect", "HandlerTool", "NotFound", "Tool", "Toolbox",
    "Tree", "UploadedFile", "config", "dispatch", "expose", "popargs", "request", "response",
    "serving", "session", "tools", "tree", "url",
    "lib", "serve_download", "serve_file",
]
