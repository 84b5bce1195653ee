"""The same tree, written once against the CherryPy API, answers the same under CherryPy
and under hostsvc.web (`from hostsvc import web as cherrypy`): statuses, redirect targets,
Allow headers and bodies of successful responses."""
from __future__ import annotations

import pytest

from hostsvc import web
from hostsvc.web.testing import Client

cherrypy = pytest.importorskip("cherrypy")


def make_app(fw):
    class Users:
        @fw.expose
        def index(self, user_id=None):
            return f"user {user_id}"

        @fw.expose
        def orders(self, user_id=None, limit="10"):
            return f"orders of {user_id} limit {limit}"

    Users = fw.popargs("user_id")(Users)

    class Dyn:
        def _cp_dispatch(self, vpath):
            if len(vpath) >= 2 and vpath[1] == "detail":
                fw.request.params["name"] = vpath.pop(0)
                return self
            return None

        @fw.expose
        def detail(self, name):
            return f"detail {name}"

    @fw.expose
    class Notes:
        def GET(self, note_id=None):
            return f"get {note_id}"

        def POST(self, title=None):
            return f"created {title}"

        def DELETE(self, note_id):
            return f"deleted {note_id}"

    class Catch:
        @fw.expose
        def default(self, *args, **kw):
            return "default " + "/".join(args) + " " + ",".join(f"{k}={v}" for k, v in sorted(kw.items()))

        @fw.expose
        def known(self):
            return "known"

    class PostOnly:
        # Tool config on a method is read from the bound method as the path is walked.
        @fw.expose
        @fw.tools.allow(methods=["POST"])
        def default(self, *args):
            return "posted " + "/".join(args)

        @fw.expose
        @fw.tools.allow(methods=["POST"])
        def only(self):
            return "only"

    class Root:
        users = Users()
        dyn = Dyn()
        catch = Catch()
        postonly = PostOnly()

        @fw.expose
        def parent(self):
            return "parent"

        # A node reached through an attribute of a bound method's function.
        parent.child = fw.expose(lambda *args: "child " + "/".join(args))

        @fw.expose
        def index(self):
            return "root"

        @fw.expose(["alias1", "alias2"])
        def aliased(self):
            return "aliased"

        @fw.expose
        def args(self, a, b="B", *rest, **kw):
            return f"{a} {b} {rest} {sorted(kw.items())}"

        @fw.expose
        def strict(self, a, b="B"):
            return f"{a} {b}"

        @fw.expose
        def multi(self, v=None):
            return repr(v)

        @fw.expose
        def boom(self):
            raise fw.HTTPError(418)

        @fw.expose
        def forbidden(self):
            raise fw.HTTPError(403, "no")

        @fw.expose
        def go(self):
            raise fw.HTTPRedirect("/target")

        @fw.expose
        def go301(self):
            raise fw.HTTPRedirect("relative", 301)

        @fw.expose
        def missing(self):
            raise fw.NotFound()

        @fw.expose
        def some_thing(self):
            return "punctuation"

        def hidden(self):
            return "hidden"

        @fw.expose
        def _private(self):
            return "private"

    class Api:
        notes = Notes()

    return Root(), Api()


PATHS = [
    ("GET", "/"), ("GET", "/index"), ("GET", "/alias1"), ("GET", "/alias2"),
    ("GET", "/aliased"), ("GET", "/args/1"), ("GET", "/args/1/2/3/4?x=y"),
    ("GET", "/args?a=1&b=2"), ("GET", "/args"), ("GET", "/strict/1/2/3"),
    ("GET", "/strict?a=1&zz=2"), ("GET", "/strict/1?a=2"), ("GET", "/multi?v=1&v=2"),
    ("GET", "/boom"), ("GET", "/forbidden"), ("GET", "/go"), ("GET", "/go301"),
    ("GET", "/missing"), ("GET", "/some-thing"), ("GET", "/some.thing"), ("GET", "/hidden"),
    ("GET", "/nothing/here"), ("GET", "/users/42"),
    ("GET", "/users/42/"), ("GET", "/users/42/orders?limit=5"), ("GET", "/users"),
    ("GET", "/users/"), ("GET", "/dyn/abc/detail"), ("GET", "/dyn/abc"), ("GET", "/catch/x/y?k=v"),
    ("GET", "/catch/known"), ("GET", "/catch"), ("GET", "/catch/"), ("GET", "/index/extra"),
    ("GET", "/%70ath-encoded"), ("GET", "/postonly/a/b"), ("POST", "/postonly/a/b"),
    ("GET", "/postonly/only"), ("POST", "/postonly/only"), ("GET", "/parent"),
    ("GET", "/parent/child/x/y"), ("GET", "/parent/nothing"),
]
API_PATHS = [
    ("GET", "/notes"), ("GET", "/notes/7"), ("POST", "/notes?title=t"), ("DELETE", "/notes/3"),
    ("PUT", "/notes/3"), ("HEAD", "/notes/1"), ("DELETE", "/notes"), ("GET", "/nope"),
]


@pytest.fixture(scope="module")
def clients():
    cherrypy.config.update({"environment": "embedded", "log.screen": False})
    cp_root, cp_api = make_app(cherrypy)
    hs_root, hs_api = make_app(web)
    method_conf_cp = {"/": {"request.dispatch": cherrypy.dispatch.MethodDispatcher()}}
    method_conf_hs = {"/": {"request.dispatch": web.dispatch.MethodDispatcher()}}
    return {
        "root": (Client(cherrypy.Application(cp_root, "")), Client(web.Application(hs_root))),
        "api": (Client(cherrypy.Application(cp_api, "", method_conf_cp)),
                Client(web.Application(hs_api, "", method_conf_hs))),
    }


def _compare(cp, hs, method, path):
    a = cp.request(method, path)
    b = hs.request(method, path)
    assert b.code == a.code, (method, path, a.status, b.status, b.body[:200])
    assert b.headers.get("Location") == a.headers.get("Location"), (method, path)
    assert b.headers.get("Allow") == a.headers.get("Allow"), (method, path)
    if a.code == 200:
        assert b.body == a.body, (method, path)


@pytest.mark.parametrize("method,path", PATHS)
def test_object_tree_matches_cherrypy(clients, method, path):
    _compare(*clients["root"], method, path)


@pytest.mark.parametrize("method,path", API_PATHS)
def test_method_dispatcher_matches_cherrypy(clients, method, path):
    _compare(*clients["api"], method, path)


@pytest.mark.parametrize("form,expected", [
    ({"a": "1"}, 200),            # body fills a required parameter
    ({"a": "1", "zz": "2"}, 400),  # unexpected body parameter: 400, not 404
])
def test_body_parameter_mismatch_matches_cherrypy(clients, form, expected):
    cp, hs = clients["root"]
    a = cp.post("/strict", form=form)
    b = hs.post("/strict", form=form)
    assert a.code == b.code == expected


def test_underscore_names_are_never_reachable(clients):
    """A deliberate difference: CherryPy serves an exposed `_private`; hostsvc never does."""
    cp, hs = clients["root"]
    assert cp.get("/_private").code == 200
    assert hs.get("/_private").code == 404
    assert hs.get("/-private").code == 404  # punctuation maps to "_" before the check
    assert hs.get("/__class__").code == 404
