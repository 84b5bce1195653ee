"""A tree using every framework feature, served by real servers: gunicorn in
test_under_gunicorn, granian in test_granian_server."""
from __future__ import annotations

import os
import threading

from hostsvc import web

HERE = os.path.dirname(os.path.abspath(__file__))


@web.expose
class Notes:
    store: dict[str, str] = {}

    def GET(self, note_id=None):
        if note_id is None:
            return sorted(self.store)
        if note_id not in self.store:
            raise web.NotFound()
        return {"id": note_id, "text": self.store[note_id]}

    def PUT(self, note_id):
        self.store[note_id] = web.request.json["text"]
        web.response.status = 201
        web.response.headers["Location"] = web.url(f"/api/notes/{note_id}")
        return {"id": note_id}


class Api:
    notes = Notes()


@web.popargs("user_id")
class Users:
    @web.expose
    def orders(self, user_id, limit="10"):
        return f"orders for {user_id} (limit {limit})"


class Docs:
    @web.expose
    def index(self):
        return "docs"


class Root:
    api = Api()
    users = Users()
    docs = Docs()

    @web.expose
    def index(self):
        return "home"

    @web.expose
    def hello(self, name="world"):
        return f"hello {name}"

    @web.expose
    def upload(self, doc):
        return f"{doc.filename}:{len(doc.fullvalue())}"

    @web.expose
    def stream(self, n="3"):
        def gen():
            for i in range(int(n)):
                yield f"line {i}\n"
        return gen()

    @web.expose
    def me(self):
        return open(os.path.join(HERE, "featured_app.py"), "rb")

    @web.expose
    def thread(self):
        return threading.current_thread().name

    @web.expose
    def client(self):
        return web.request.remote.ip

    @web.expose
    def crash(self):
        raise ZeroDivisionError("hidden")

    @web.expose
    def moved(self):
        raise web.HTTPRedirect("/hello?name=moved")

    @web.expose
    def lines(self):
        """The body's lines as the handler iterates them (readline under the hood)."""
        return repr([line for line in web.request.body])

    @web.expose
    def where(self):
        r = web.request
        return f"{r.script_name}|{r.path_info}|{web.url('/x')}"


def not_found_page(status, message, traceback, version):
    return f"<h1>Nothing here</h1><p>{status}: {message}</p>"


CONFIG = {
    "/": {"request.max_body_size": 64 * 1024, "tools.proxy.on": True,
          "error_page.404": not_found_page},
    "/api": {"request.dispatch": "method", "tools.json_out.on": True},
    "/api/notes": {"tools.json_in.on": True, "tools.json_in.force": False},
    "/stream": {"tools.gzip.on": True, "tools.gzip.mime_types": ["text/*"]},
    "/static": {"tools.staticdir.on": True, "tools.staticdir.dir": HERE},
}

application = web.Application(Root(), config=CONFIG)
# The same tree mounted at /app and served directly, so the application itself moves the
# prefix into SCRIPT_NAME (paths outside it are served as they are).
mounted = web.Application(Root(), "/app", config=CONFIG)
