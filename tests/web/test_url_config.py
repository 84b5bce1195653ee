"""url() under mount prefixes and proxies; config normalisation; tree.mount."""
from __future__ import annotations

import pytest

from hostsvc import web
from hostsvc.web.config import normalize
from hostsvc.web.testing import Client


class Child:
    @web.expose
    def index(self):
        return web.url()

    @web.expose
    def page(self, rel=""):
        return web.url(rel, qs={"a": ["1", "2"]} if rel == "q" else "")


class Root:
    child = Child()

    @web.expose
    def index(self):
        return web.url("/abs", "x=1")


def test_url_honours_script_name():
    c = Client(web.Application(Root(), "/app"), script_name="/app")
    assert c.get("/").text == "http://testserver/app/abs?x=1"
    assert c.get("/child/").text == "http://testserver/app/child/"
    assert c.get("/child/page?rel=other").text == "http://testserver/app/child/other"
    assert c.get("/child/page?rel=../up").text == "http://testserver/app/up"
    assert c.get("/child/page?rel=q").text == "http://testserver/app/child/q?a=1&a=2"


def test_url_behind_proxy_uses_forwarded_host_and_scheme():
    app = web.Application(Root(), "/app", {"/": {"tools.proxy.on": True}})
    c = Client(app, script_name="/app")
    r = c.get("/", headers={"X-Forwarded-Host": "shop.example", "X-Forwarded-Proto": "https"})
    assert r.text == "https://shop.example/app/abs?x=1"


def test_application_served_directly_strips_its_prefix():
    c = Client(web.Application(Root(), "/app"))
    assert c.get("/app/child/").text == "http://testserver/app/child/"


def test_tree_mount_routes_by_prefix():
    tree = web.Tree()
    tree.mount(Root(), "/a")
    tree.mount(Child(), "/b")
    c = Client(tree)
    assert c.get("/a/").text == "http://testserver/a/abs?x=1"
    assert c.get("/b/").text == "http://testserver/b/"
    assert c.get("/zzz").code == 404


def test_global_tree_mount_returns_application():
    app = web.tree.mount(Root(), "/g", {"/": {"tools.gzip.on": True}})
    assert isinstance(app, web.Application)
    assert app.config["/"]["tools.gzip.on"] is True


def test_config_accepts_nested_dicts_and_flattens():
    conf = normalize({"/static/": {"tools": {"staticdir": {"on": True, "dir": "x",
                                                           "content_types": {"a": "b"}}}},
                      "/": {"error_page": {404: "f.html"}}})
    assert conf["/static"] == {"tools.staticdir.on": True, "tools.staticdir.dir": "x",
                               "tools.staticdir.content_types": {"a": "b"}}
    assert conf["/"] == {"error_page.404": "f.html"}


@pytest.mark.parametrize("bad,message", [
    ({"static": {}}, "must be a URL path"),
    ({"/": {"toolz.x": 1}}, "not in a known namespace"),
    ({"/": ["x"]}, "must map keys to values"),
    ({"/": {"request.dispatch": 42}}, "must be a dispatcher"),
])
def test_config_errors_are_clear(bad, message):
    with pytest.raises(ValueError, match=message):
        normalize(bad)


def test_dispatcher_named_in_config():
    @web.expose
    class Res:
        def GET(self):
            return "got"
    class R:
        res = Res()
    c = Client(web.Application(R(), config={"/": {"request.dispatch": "method"}}))
    assert c.get("/res").text == "got"
    assert c.post("/res").code == 405


def test_dispatcher_per_section():
    @web.expose
    class Res:
        def GET(self):
            return "rest"
    class Api:
        res = Res()
    class R:
        api = Api()
        @web.expose
        def index(self):
            return "plain"
    c = Client(web.Application(R(), config={"/api": {"request.dispatch": "method"}}))
    assert c.get("/").text == "plain"
    assert c.get("/api/res").text == "rest"
    assert c.delete("/api/res").code == 405


def test_global_config_update_invalidates_cached_merges():
    app = web.Application(Root())
    c = Client(app)
    assert c.get("/child").code == 301
    try:
        web.config.update({"tools.trailing_slash.on": False})
        assert c.get("/child").code == 200
    finally:
        web.config.reset()
    assert c.get("/child").code == 301
