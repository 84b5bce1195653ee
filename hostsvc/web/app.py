"""The WSGI application: one request's life from environ to response.

Order of events, as in CherryPy: parse the query string, dispatch (find the handler and
the config for the path), run tools at their hook points around reading the body and
calling the handler, turn errors and redirects into responses, then hand status, headers
and body to the server. on_end_request hooks run when the server closes the body.
"""
from __future__ import annotations

import inspect
import logging
import traceback
from typing import Any, Callable, Iterable

from .config import config as global_config
from .config import normalize
from .context import serving
from .dispatch import Dispatcher, Resolution
from .errors import HTTPError, HTTPRedirect
from .request import Request
from .response import Response
from .tools import HookMap

log = logging.getLogger("hostsvc.web")

_CACHE_LIMIT = 2048


class Application:
    """A WSGI callable serving an object tree: `Application(Root(), "/blog", config)`."""

    # Each response's status line is also left in the environ under this key, so a
    # middleware that wants it (hostsvc's request metrics) need not wrap start_response,
    # which costs a function per request. A promise about __call__ below: a subclass
    # that overrides __call__ must declare it again to be believed (hostsvc.statusline).
    status_environ_key = "hostsvc.status"

    def __init__(self, root: Any, script_name: str = "", config: dict[str, Any] | None = None
                 ) -> None:
        from .builtins import tools

        self.root = root
        self.script_name = script_name.rstrip("/")
        self.config = normalize(config)
        self.toolbox = tools
        self._default_dispatcher = Dispatcher()
        self.routes: dict[str, Resolution] = {}
        self._merged: dict[tuple, tuple[dict[str, Any], HookMap, list]] = {}
        self._merged_version = -1
        self._dispatch_sections = sorted(
            (p for p, sect in self.config.items() if "request.dispatch" in sect),
            key=len, reverse=True)

    def merge(self, config: dict[str, Any]) -> None:
        """Add per-path config after creation (CherryPy's app.merge)."""
        for path, section in normalize(config).items():
            self.config.setdefault(path, {}).update(section)
        self._merged.clear()
        self.routes.clear()
        self._dispatch_sections = sorted(
            (p for p, sect in self.config.items() if "request.dispatch" in sect),
            key=len, reverse=True)

    def reset_routes(self) -> None:
        """Forget remembered path resolutions (after changing the tree at run time)."""
        self.routes.clear()

    # -- config ------------------------------------------------------------------------
    def _dispatcher_for(self, path: str) -> Callable[[Any, str], Resolution]:
        for section in self._dispatch_sections:
            if section == "/" or path == section or path.startswith(section + "/"):
                return self.config[section]["request.dispatch"]
        return self._default_dispatcher

    def _config_for(self, res: Resolution) -> tuple[dict[str, Any], HookMap]:
        """Merged config and tool hooks for a dispatch's config sources, cached.

        Sources are long-lived dicts (class `_cp_config`, app config sections), so their
        identities key the cache; the cache keeps them referenced so ids are not reused.
        A remembered (static) resolution also carries its merge, which `_respond` takes
        without calling this.
        """
        version = global_config.version
        if self._merged_version != version:
            self._merged.clear()
            self._merged_version = version
        sources = res.sources
        key = tuple(s if isinstance(s, tuple) else id(s) for s in sources)
        hit = self._merged.get(key)
        if hit is None:
            merged = dict(global_config)
            for source in sources:
                if isinstance(source, tuple):
                    merged["tools.staticdir.section"] = source[1]
                else:
                    merged.update(source)
            hooks = self.toolbox.build_hooks(merged)
            if len(self._merged) >= _CACHE_LIMIT:
                self._merged.clear()
            hit = self._merged[key] = (merged, hooks, sources)
        if res.static:
            res.merged = (version, hit[0], hit[1])
        return hit[0], hit[1]

    # -- WSGI ----------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        prefix = self.script_name
        if prefix and not environ.get("SCRIPT_NAME"):
            # Served directly (not behind hostsvc's proxy): strip our own mount prefix.
            path = environ.get("PATH_INFO", "")
            if path == prefix or path.startswith(prefix + "/"):
                environ["SCRIPT_NAME"] = prefix
                environ["PATH_INFO"] = path[len(prefix):]
        req = Request(environ, self)
        resp = Response()
        serving.request = req
        serving.response = resp
        # This request's own hooks: empty until dispatch finds the path's tools.
        req.hooks = HookMap()
        try:
            self._respond(req, resp)
        except BaseException:
            serving.request = serving.response = None
            raise
        if environ.get("CONTENT_LENGTH"):
            _drain_body(req)
        status, headers, body = self._finalize(req, resp, environ)
        environ[self.status_environ_key] = status
        start_response(status, headers)
        if type(body) is not list or req.hooks.has("on_end_request"):
            # A list is whole and has no close(): nothing is left to do once it is sent.
            return _ClosingBody(body, req, resp)
        serving.request = serving.response = None
        return body

    def _finalize(self, req: Request, resp: Response, environ: dict[str, Any]
                  ) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
        try:
            status, headers, body = resp.finalize(environ)
        except Exception:
            log.exception("error finalizing the response to %s %s", req.method, req.path_info)
            resp.headers.clear()
            resp.status = 200
            HTTPError(500).set_response()
            status, headers, body = resp.finalize(environ)
        if req.method == "HEAD":
            close = getattr(body, "close", None)
            if close is not None:
                close()
            body = [b""]
        return status, headers, body

    def _respond(self, req: Request, resp: Response) -> None:
        hooks = req.hooks
        # Most paths have hooks at one or two points: `point in hooks._hooks` skips the
        # others without a call. It is read afresh each time: attach() replaces the dict.
        try:
            try:
                if not req.valid_path:
                    raise HTTPError(400, "The request path is not valid percent-encoded UTF-8.")
                if req.query_string:
                    req.params = dict(req.query)
                path = req.path_info
                dispatcher = self._dispatcher_for(path) if self._dispatch_sections \
                    else self._default_dispatcher
                res = dispatcher(self, path)
                merged = res.merged
                if merged is not None and merged[0] == global_config.version:
                    req.config, cached = merged[1], merged[2]
                else:
                    req.config, cached = self._config_for(res)
                hooks.use(cached)
                req.is_index = res.is_index
                req.handler = res.handler
                if "on_start_resource" in hooks._hooks:
                    hooks.run("on_start_resource")
                if "before_request_body" in hooks._hooks:
                    hooks.run("before_request_body")
                if req.process_request_body:
                    req.process_body()
                    for key, value in req.form.items():
                        _merge_param(req.params, key, value)
                if "before_handler" in hooks._hooks:
                    hooks.run("before_handler")
                handler = req.handler
                if handler is not None:
                    if isinstance(handler, HTTPError):
                        raise handler
                    params = req.params
                    try:
                        resp.body = handler(*res.vpath, **params)
                    except TypeError:
                        _check_signature(getattr(handler, "__wrapped__", handler), res.vpath,
                                         params, req.form)
                        raise
                if "before_finalize" in hooks._hooks:
                    hooks.run("before_finalize")
            except (HTTPRedirect, HTTPError) as inst:
                # As in CherryPy: an expected outcome, so before_finalize still runs
                # (a session changed before `raise HTTPRedirect` is saved).
                inst.set_response()
                req.hooks.run("before_finalize")
        except (HTTPRedirect, HTTPError) as inst:
            inst.set_response()
        except Exception:
            self._handle_error(req)
        finally:
            req.hooks.run("on_end_resource")

    @staticmethod
    def _handle_error(req: Request) -> None:
        """An unexpected exception: log it, answer 500, run the error hooks around that."""
        tb = traceback.format_exc()
        log.error("%s %s raised:\n%s", req.method, req.script_name + req.path_info, tb)
        shown = tb if req.config.get("request.show_tracebacks") else None
        hooks = req.hooks
        try:
            hooks.run("before_error_response")
            HTTPError(500).set_response(shown)
            hooks.run("after_error_response")
        except (HTTPRedirect, HTTPError) as inst:
            inst.set_response()
        except Exception:
            log.exception("error while building the error response")
            HTTPError(500).set_response(None)

    def __repr__(self) -> str:
        return f"<Application {type(self.root).__name__} at {self.script_name or '/'}>"


# Unread request bodies up to this size are read and dropped before answering.
DRAIN_LIMIT = 16 * 1024 * 1024


def _drain_body(req: Request) -> None:
    """Read what is left of the request body when the answer did not need it (a 413, a
    redirect, a handler that ignored an upload). Closing a socket with unread data makes
    the kernel send a reset, and nginx, still writing the body, turns that into a 502
    instead of our answer. Bodies larger than DRAIN_LIMIT are not worth reading."""
    env = req.wsgi_environ
    try:
        remaining = int(env["CONTENT_LENGTH"])
    except ValueError:
        return
    body = req.__dict__.get("body")
    if body is not None:
        remaining -= body._read
    if not 0 < remaining <= DRAIN_LIMIT:
        return
    stream = env["wsgi.input"]
    try:
        while remaining > 0:
            chunk = stream.read(min(remaining, 65536))
            if not chunk:
                return
            remaining -= len(chunk)
    except (OSError, ValueError):
        return  # the client went away: nothing left to protect


def _merge_param(params: dict[str, Any], key: str, value: Any) -> None:
    if key in params:
        existing = params[key]
        existing = existing if isinstance(existing, list) else [existing]
        params[key] = existing + (value if isinstance(value, list) else [value])
    else:
        params[key] = value


def _check_signature(handler: Callable[..., Any], vpath: list[str], params: dict[str, Any],
                     body_params: dict[str, Any]) -> None:
    """Turn a call that does not fit the handler's signature into CherryPy's 404 or 400.

    404: the URL (path segments or query string) does not fit; 400: the form body does not.
    Returns quietly when the signature fits, so the TypeError came from inside the handler.
    """
    args: list[Any] = list(vpath)
    if inspect.ismethod(handler):
        # The bound method's signature hides `self`, so a parameter named "self" would look
        # acceptable; check the function with the instance as its first argument.
        args.insert(0, handler.__self__)
        handler = handler.__func__
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **params)
        return
    except TypeError:
        pass
    accepted = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in accepted.values())
    positional = [p for p in accepted.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not var_pos and len(args) > len(positional):
        raise HTTPError(404, "Too many path segments for this resource.")
    taken = {p.name for p in positional[:len(args)]}
    missing = [p.name for p in accepted.values()
               if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and p.name not in taken and p.name not in params]
    if missing:  # CherryPy reports what is missing before what is extra
        raise HTTPError(404, f"Missing parameters: {', '.join(missing)}")
    if not var_kw:
        unexpected = [k for k in params if k not in accepted or
                      accepted[k].kind in (accepted[k].POSITIONAL_ONLY, accepted[k].VAR_POSITIONAL)]
        in_body = [k for k in unexpected if k in body_params]
        if in_body:
            raise HTTPError(400, f"Unexpected body parameters: {', '.join(sorted(in_body))}")
        if unexpected:
            raise HTTPError(404, "Unexpected query string parameters: "
                                 f"{', '.join(sorted(unexpected))}")
    multiple = [k for k in params if k in taken]
    if multiple:
        code = 400 if any(k in body_params for k in multiple) else 404
        raise HTTPError(code, f"Multiple values for parameters: {', '.join(sorted(multiple))}")
    raise HTTPError(404, "The request does not match this resource's parameters.")


class _ClosingBody:
    """Keeps the request context alive while a streamed body is sent, then runs
    on_end_request hooks and clears the context when the server closes it."""

    __slots__ = ("_body", "_req", "_resp")

    def __init__(self, body: Iterable[bytes], req: Request, resp: Response) -> None:
        self._body = body
        self._req = req
        self._resp = resp

    def __iter__(self):
        serving.request = self._req
        serving.response = self._resp
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            serving.request = self._req
            serving.response = self._resp
            try:
                self._req.hooks.run("on_end_request")
            finally:
                serving.request = serving.response = None


class Tree:
    """CherryPy's `tree`: `web.tree.mount(root, "/blog", config)` returns the Application.

    hostsvc mounts one application per pool, so the tree only records what was mounted
    and can serve them all from one WSGI callable when run outside hostsvc.
    """

    def __init__(self) -> None:
        self.apps: dict[str, Application] = {}

    def mount(self, root: Any, script_name: str = "", config: dict[str, Any] | None = None
              ) -> Application:
        app = root if isinstance(root, Application) else Application(root, script_name, config)
        if isinstance(root, Application) and config:
            app.merge(config)
        self.apps[app.script_name] = app
        return app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        for prefix in sorted(self.apps, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "/") or not prefix:
                environ = dict(environ)
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
                environ["PATH_INFO"] = path[len(prefix):]
                return self.apps[prefix](environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", "9")])
        return [b"Not Found"]


tree = Tree()
