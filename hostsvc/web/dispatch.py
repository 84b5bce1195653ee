"""Object-tree dispatch: from a URL path to an exposed handler, its arguments and config.

`/blog/post/42` walks `root.blog.post`; leftover segments become positional arguments;
`index` serves a node and `default` catches what nothing else matched. The walk follows
CherryPy's Dispatcher rule for rule (including `_cp_dispatch` and popargs), so trees
written for CherryPy resolve to the same handlers.
"""
from __future__ import annotations

import inspect
import string
import sys
from types import MethodType
from typing import Any, Callable, Iterable

from .context import serving
from .errors import HTTPError, NotFound

_TRANSLATE = str.maketrans(string.punctuation, "_" * len(string.punctuation))
DISPATCH_METHOD = "_cp_dispatch"


def expose(func: Any = None, alias: str | Iterable[str] | None = None) -> Any:
    """Mark a method (or class) as reachable by URL, with optional alias names.

    Usable bare (`@expose`), called (`@expose()`), or with aliases (`@expose(["a", "b"])`,
    `@expose("a")`, `@expose(alias="a")`). Aliases are added to the namespace of the class
    body being defined, which is the caller's frame, as in CherryPy.
    """
    if callable(func) and alias is None:
        func.exposed = True
        return func
    if func is not None and not callable(func):
        alias, func = func, None
    parents = sys._getframe(1).f_locals
    names = [] if alias is None else [alias] if isinstance(alias, str) else list(alias)

    def expose_(f: Any) -> Any:
        f.exposed = True
        for name in names:
            parents[name.replace(".", "_")] = f
        return f

    return expose_(func) if func is not None else expose_


def popargs(*names: str, handler: Any = None) -> Callable[..., Any]:
    """Class decorator: take path segments as named parameters (`/users/42` -> user_id="42").

    `@popargs("user_id") class Users: ...` makes `/users/42/orders` call
    `Users().orders(user_id="42")`. With `handler=`, the popped segments go to that
    handler instead of continuing the walk on the decorated object.
    """

    def dispatch(self_or_cls: Any = None, vpath: list[str] | None = None) -> Any:
        if inspect.isclass(self_or_cls):
            setattr(self_or_cls, DISPATCH_METHOD, dispatch)
            return self_or_cls
        params = serving.request.params
        for name in names:
            if not vpath:
                break
            params[name] = vpath.pop(0)
        if handler is not None:
            return handler
        if vpath:
            seg = vpath.pop(0).translate(_TRANSLATE)
            return None if seg.startswith("_") else getattr(self_or_cls, seg, None)
        return self_or_cls

    return dispatch


class Resolution:
    """What a dispatch found: the handler, its positional args, and the config sources.

    `static` is true when the walk depended only on the path (no `_cp_dispatch` ran), so
    the same path always resolves the same way and the result may be reused. A reused
    resolution is shared between requests and must not be modified.
    """

    __slots__ = ("handler", "vpath", "sources", "is_index", "static", "merged")

    def __init__(self, handler: Any, vpath: list[str], sources: list[Any],
                 is_index: bool | None, static: bool = False) -> None:
        self.handler = handler
        self.vpath = vpath
        self.sources = sources
        self.is_index = is_index
        self.static = static
        self.merged: tuple[int, dict[str, Any], Any] | None = None  # set by the application


_ROUTE_CACHE_LIMIT = 4096


def _attributes_of(node: Any) -> Any:
    """Where to read `node`'s attributes: a bound method's function, else the node.

    The function has the same attributes under every name dispatch reads (MethodType
    adds dunders only), and a miss on it costs ~50 ns against ~900 ns on the bound
    method, which raises and catches an AttributeError inside. Handlers are bound
    methods, and a path that walks past one (`/item/42`) reads four missing names.
    """
    return node.__func__ if type(node) is MethodType else node


class Dispatcher:
    """CherryPy's default dispatcher: walk attributes segment by segment."""

    def __init__(self, translate: dict[int, Any] = _TRANSLATE) -> None:
        self.translate = translate

    def find_handler(self, app: Any, path: str) -> Resolution:
        """Walk the tree for `path`; `sources` lists the config dicts met, outermost first.

        A source is a config dict or ("section", "/path") marking where
        tools.staticdir was configured (so staticdir knows which prefix to strip).
        """
        root = app.root
        app_config = app.config
        fullpath = [seg for seg in path.strip("/").split("/") if seg]
        fullpath.append("index")
        fullpath_len = len(fullpath)
        sources: list[Any] = []
        conf = getattr(root, "_cp_config", None)
        if conf:
            sources.append(conf)
        conf = app_config.get("/")
        if conf:
            self._add(sources, conf, "/")
        trail: list[Any] = [root]
        trail_segleft = [fullpath_len]
        node = attrs = root
        names = fullpath[:]
        translate = self.translate
        # The default table maps ASCII punctuation only: an alphanumeric name keeps as is.
        plain_unchanged = translate is _TRANSLATE
        static = True
        while names:
            name = names[0]
            pre_len = len(names)
            if node is None:
                subnode = None
            else:
                objname = name if plain_unchanged and name.isalnum() \
                    else name.translate(translate)
                subnode = None if objname.startswith("_") else getattr(attrs, objname, None)
            if subnode is None:
                disp = getattr(attrs, DISPATCH_METHOD, None) if node is not None else None
                if disp is not None and callable(disp) and \
                        not getattr(disp, "exposed", False) and pre_len > 1:
                    index_name = names.pop()
                    static = False
                    subnode = disp(vpath=names)
                    names.append(index_name)
                else:
                    names.pop(0)
            else:
                names.pop(0)
            segleft = len(names)
            if segleft > pre_len:
                raise RuntimeError(f"_cp_dispatch added a path segment while resolving {path!r}")
            if segleft == pre_len:
                names.pop(0)
                segleft -= 1
            node = subnode
            attrs = _attributes_of(node)
            if node is not None:
                conf = getattr(attrs, "_cp_config", None)
                if conf:
                    sources.append(conf)
            if app_config:
                existing = fullpath_len - pre_len
                curpath = "/" + "/".join(fullpath[:existing]) if existing else ""
                for seg in fullpath[existing:fullpath_len - segleft]:
                    curpath += "/" + seg
                    conf = app_config.get(curpath)
                    if conf:
                        self._add(sources, conf, curpath)
            trail.append(node)
            trail_segleft.append(segleft)

        last = len(trail) - 1
        for i in range(last, -1, -1):
            candidate = trail[i]
            if candidate is None:
                continue
            segleft = trail_segleft[i]
            attrs = _attributes_of(candidate)
            default = getattr(attrs, "default", None)
            if default is not None and getattr(default, "exposed", False):
                conf = getattr(_attributes_of(default), "_cp_config", None)
                if conf:
                    sources.append(conf)
                return Resolution(default, fullpath[fullpath_len - segleft:-1], sources,
                                  path.endswith("/"), static)
            if getattr(attrs, "exposed", False):
                return Resolution(candidate, fullpath[fullpath_len - segleft:-1], sources,
                                  i == last, static)
        return Resolution(None, [], sources, None, static)

    def resolve(self, app: Any, path: str) -> Resolution:
        """find_handler, remembered per path while the walk depends on the path alone.

        The tree's attributes are read once per path: a tree changed at run time
        (attributes added or removed after serving began) needs `app.reset_routes()`.
        """
        cache = app.routes
        res = cache.get(path)
        if res is None:
            res = self.find_handler(app, path)
            if res.static:
                if len(cache) >= _ROUTE_CACHE_LIMIT:
                    cache.clear()
                cache[path] = res
        return res

    @staticmethod
    def _add(sources: list[Any], conf: dict[str, Any], section: str) -> None:
        sources.append(conf)
        if "tools.staticdir.dir" in conf:
            sources.append(("section", section))

    def __call__(self, app: Any, path: str) -> Resolution:
        res = app.routes.get(path) or self.resolve(app, path)
        if res.handler is None:
            return Resolution(NotFound(), res.vpath, res.sources, res.is_index)
        return res


class MethodDispatcher(Dispatcher):
    """REST dispatch: the exposed node's GET/POST/PUT/PATCH/DELETE method handles the verb.

    Every answer carries an `Allow` header listing the node's methods; an unsupported
    method is a 405; HEAD is served by GET when the node has no HEAD.
    """

    def __init__(self, translate: dict[int, Any] = _TRANSLATE) -> None:
        super().__init__(translate)
        self._allow: dict[type, str] = {}

    def __call__(self, app: Any, path: str) -> Resolution:
        res = app.routes.get(path) or self.resolve(app, path)
        resource = res.handler
        if resource is None:
            return Resolution(NotFound(), res.vpath, res.sources, res.is_index)
        allow = self._allow.get(type(resource))
        if allow is None:
            avail = [m for m in dir(resource) if m.isupper() and not m.startswith("_")]
            if "GET" in avail and "HEAD" not in avail:
                avail.append("HEAD")
            allow = self._allow[type(resource)] = ", ".join(sorted(avail))
        serving.response.headers["Allow"] = allow
        method = serving.request.method
        func = getattr(resource, method, None) \
            if method.isupper() and not method.startswith("_") else None
        if func is None and method == "HEAD":
            func = getattr(resource, "GET", None)
        if not callable(func):
            return Resolution(HTTPError(405), res.vpath, res.sources, res.is_index)
        conf = getattr(func, "_cp_config", None)
        sources = res.sources + [conf] if conf else res.sources
        return Resolution(func, res.vpath, sources, res.is_index)
