"""An object-tree app for the integration tests: what the framework sees behind nginx."""
import json

from hostsvc import web


class Root:
    @web.expose
    def index(self):
        return json.dumps({
            "remote_ip": web.request.remote.ip,
            "base": web.request.base,
            "url": web.url("/item/7"),
            "script_name": web.request.script_name,
            "path_info": web.request.path_info,
        })

    @web.expose
    def item(self, number):
        return f"item {number}"

    @web.expose
    def search(self, q=""):
        return f"searching {q}"
