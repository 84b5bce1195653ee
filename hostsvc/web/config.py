"""Per-path application config: normalising what users write, and the global defaults.

Config is a dict keyed by path ("/", "/static") whose values map dotted keys in
namespaces (`tools.*`, `request.*`, `response.*`, `error_page.*`) to values. Nested
dicts are accepted and flattened, so YAML can say either `tools.gzip.on: true` or
`tools: {gzip: {on: true}}`.
"""
from __future__ import annotations

import importlib
from typing import Any

NAMESPACES = ("tools", "request", "response", "error_page", "log", "hostsvc")


class GlobalConfig(dict):
    """`web.config`: defaults under every application's config (lowest precedence).

    `version` changes on every update so applications know their cached merges are stale.
    """

    version = 0

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        other = dict(*args, **kwargs)
        super().update(flatten(other))
        self.version += 1

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.version += 1

    def reset(self) -> None:
        """Back to the built-in defaults (tests use this)."""
        self.clear()
        super().update(DEFAULTS)
        self.version += 1


DEFAULTS: dict[str, Any] = {
    "tools.trailing_slash.on": True,
}

config = GlobalConfig(DEFAULTS)


def flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"tools": {"gzip": {"on": True}}} -> {"tools.gzip.on": True}."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        full = prefix + str(key)
        if isinstance(value, dict) and full.split(".", 1)[0] in NAMESPACES and \
                not _is_leaf_dict(full):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _is_leaf_dict(key: str) -> bool:
    # Tool arguments that are themselves mappings (content_types, users, ...).
    return key.count(".") >= 2


def normalize(app_config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Validate and flatten an application config; paths must start with "/"."""
    if not app_config:
        return {}
    if not isinstance(app_config, dict):
        raise ValueError(f"application config must be a dict keyed by path, "
                         f"not {type(app_config).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for path, section in app_config.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"config section {path!r} must be a URL path starting with '/' "
                             f"(for example '/' or '/static')")
        if not isinstance(section, dict):
            raise ValueError(f"config section {path!r} must map keys to values, "
                             f"not {type(section).__name__}")
        norm = path.rstrip("/") or "/"
        flat = flatten(section)
        for key in flat:
            if key.split(".", 1)[0] not in NAMESPACES:
                raise ValueError(f"config key {key!r} in section {path!r} is not in a known "
                                 f"namespace; expected one of {', '.join(NAMESPACES)}")
        if "request.dispatch" in flat:
            flat["request.dispatch"] = resolve_dispatcher(flat["request.dispatch"])
        out[norm] = flat
    return out


def resolve_dispatcher(value: Any) -> Any:
    """A dispatcher instance from an instance, a class, "method"/"default", or "mod:attr"."""
    from . import dispatch

    if isinstance(value, str):
        named = {"method": dispatch.MethodDispatcher, "default": dispatch.Dispatcher}
        if value.lower() in named:
            value = named[value.lower()]
        else:
            module, _, attr = value.replace(":", ".").rpartition(".")
            value = getattr(importlib.import_module(module), attr)
    if isinstance(value, type):
        value = value()
    if not callable(value):
        raise ValueError(f"request.dispatch must be a dispatcher, got {value!r}")
    return value
