"""From an app's config to the WSGI callable its pool serves.

`import_string` imports `package.module:attribute` with extra import paths and errors a
user can act on. Why not importlib alone: a user's app lives in a folder mounted into the container, so
its directory must go on sys.path first, and "ModuleNotFoundError: No module named 'x'"
without saying which paths were searched (or that the module exists but the attribute
does not) sends people hunting. LoadError messages say what was tried.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .statusline import status_environ_key

if TYPE_CHECKING:
    from .config import AppConfig


class LoadError(Exception):
    """The target could not be imported; the message is meant for the user as is."""


def add_paths(paths: Iterable[str]) -> None:
    """Put `paths` at the front of sys.path, in order, without duplicates."""
    for path in reversed(list(paths)):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def import_string(spec: str, paths: Iterable[str] = ()) -> Any:
    """Return the object named by "package.module:attr.sub" after adding `paths`."""
    paths = list(paths)
    add_paths(paths)
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise LoadError(f"{spec!r} is not of the form package.module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            where = ", ".join(paths) if paths else "no extra python_path"
            raise LoadError(f"cannot import {module_name!r}: no module named {exc.name!r} "
                            f"(searched {where} and the installed packages)") from None
        raise LoadError(f"importing {module_name!r} failed: {_last_frame(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any error in user code is reported, not raised
        raise LoadError(f"importing {module_name!r} failed: {_last_frame(exc)}") from None
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoadError(f"module {module_name!r} ({getattr(module, '__file__', '?')}) "
                            f"has no attribute {attr_path!r}") from None
    return obj


def _last_frame(exc: BaseException) -> str:
    """`ValueError: boom (at app.py:12)`: the error and where in user code it happened."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename]
    where = f" (at {user[-1].filename}:{user[-1].lineno})" if user else ""
    return f"{type(exc).__name__}: {exc}{where}"


class PrefixMiddleware:
    """Sets SCRIPT_NAME to the app's mount prefix and PATH_INFO to the rest.

    Chosen over a trusted SCRIPT_NAME header from nginx because the prefix is fixed per
    pool and known here: nothing depends on header trust or on how an engine treats that
    header, the app sees the same environ whether reached through nginx or straight
    through its socket (tests, probes), and a path outside the prefix is a clean 404.
    """

    # Where the app leaves its status line, if it does (hostsvc.statusline); this
    # middleware's own 404 leaves it there too.
    status_environ_key: str | None = None

    def __init__(self, app: Callable[..., Any], prefix: str) -> None:
        self.app = app
        self.prefix = "" if prefix == "/" else prefix
        self.status_environ_key = status_environ_key(app)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        prefix = self.prefix
        if prefix:
            path = environ.get("PATH_INFO", "")
            if path == prefix or path.startswith(prefix + "/"):
                environ["SCRIPT_NAME"] = prefix
                environ["PATH_INFO"] = path[len(prefix):]
            elif not environ.get("SCRIPT_NAME"):
                if self.status_environ_key:
                    environ[self.status_environ_key] = "404 Not Found"
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"Not Found\n"]
        return self.app(environ, start_response)


def build_app(app: AppConfig) -> Callable[..., Any]:
    """The WSGI callable for `app`: an object tree wrapped in hostsvc.web, or the callable.

    Object trees get `tools.proxy.on: True` at "/" unless the config says otherwise, so
    `web.request.remote.ip` and `web.url()` describe the client behind nginx. `root:` may
    also name a ready `web.Application` (an app that ships its own per-path config, such
    as a MethodDispatcher section): the YAML `config:` is merged over its own.
    """
    target = import_string(app.target, app.python_path)
    if app.kind == "root":
        from hostsvc import web

        config = {path: dict(section) for path, section in app.config.items()}
        script_name = "" if app.prefix == "/" else app.prefix
        if isinstance(target, web.Application):
            if "tools.proxy.on" not in target.config.get("/", {}):
                config.setdefault("/", {}).setdefault("tools.proxy.on", True)
            target.script_name = script_name
            target.merge(config)
            wsgi = target
        else:
            config.setdefault("/", {}).setdefault("tools.proxy.on", True)
            root = target() if isinstance(target, type) else target
            wsgi = web.Application(root, script_name, config)
    else:
        wsgi = target
        if not callable(wsgi):
            raise LoadError(f"{app.target} is a {type(wsgi).__name__}, not a WSGI callable")
    return PrefixMiddleware(wsgi, app.prefix)
