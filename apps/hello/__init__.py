"""hello: the smallest hostsvc object-tree app (index, a path argument, a query argument,
a redirect). Mounted by config/hostsvc.yaml as `root: hello:Root`."""
from hostsvc import web


class Root:
    @web.expose
    def index(self) -> str:
        return f"Hello from hostsvc! You are {web.request.remote.ip}.\n"

    @web.expose
    def greet(self, name: str = "world") -> str:
        """/greet/Ada (path argument) or /greet?name=Ada (query argument)."""
        return f"Hello, {name}!\n"

    @web.expose
    def home(self) -> None:
        """Redirects to the index; web.url() keeps the mount prefix and the real host."""
        raise web.HTTPRedirect(web.url("/"))
