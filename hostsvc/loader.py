"""Importing `package.module:attribute` with extra import paths and errors a user can act on.

Why not importlib alone: a user's app lives in a folder mounted into the container, so
its directory must go on sys.path first, and "ModuleNotFoundError: No module named 'x'"
without saying which paths were searched (or that the module exists but the attribute
does not) sends people hunting. LoadError messages say what was tried.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any, Iterable


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
