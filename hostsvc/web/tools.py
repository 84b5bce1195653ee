"""Tools: callables attached to named hook points of the request, switched on by config.

A tool is enabled for a path with config (`tools.gzip.on: true`, arguments as
`tools.gzip.compress_level: 6`) or with its decorator on a handler
(`@web.tools.gzip(compress_level=6)`). Writing one takes a few lines:

    def add_server_header(value="hostsvc"):
        web.response.headers["Server"] = value
    web.tools.server = web.Tool("before_finalize", add_server_header)

Which tools run, in what order and with what arguments, depends only on the merged
config, so the application computes the hook map once per distinct config and reuses it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .context import serving
from .errors import NotFound

log = logging.getLogger("hostsvc.web")

HOOK_POINTS = (
    "on_start_resource",
    "before_request_body",
    "before_handler",
    "before_finalize",
    "on_end_resource",
    "on_end_request",
    "before_error_response",
    "after_error_response",
)
# Hooks that must all run even when one of them fails (clean-up points).
FAILSAFE_POINTS = frozenset(("on_end_resource", "on_end_request"))


class HookMap:
    """Callbacks per hook point, each list sorted by priority (lower runs first)."""

    __slots__ = ("_hooks", "_shared")

    def __init__(self, hooks: dict[str, list[tuple[int, Callable[..., Any], dict]]] | None = None
                 ) -> None:
        # The dict may be shared with other requests (it is cached per config): `attach`
        # copies it before the first change.
        self._hooks = hooks if hooks is not None else {}
        self._shared = True

    def attach(self, point: str, callback: Callable[..., Any], priority: int = 50,
               **kwargs: Any) -> None:
        """Add a callback for this request only (the cached map is copied first)."""
        if point not in HOOK_POINTS:
            raise ValueError(f"unknown hook point {point!r}; expected one of {HOOK_POINTS}")
        if self._shared:
            self._hooks = {k: list(v) for k, v in self._hooks.items()}
            self._shared = False
        entries = self._hooks.setdefault(point, [])
        entries.append((priority, callback, kwargs))
        entries.sort(key=lambda e: e[0])

    def has(self, point: str) -> bool:
        return bool(self._hooks.get(point))

    def run(self, point: str) -> None:
        entries = self._hooks.get(point)
        if not entries:
            return
        if point in FAILSAFE_POINTS:
            for _, callback, kwargs in entries:
                try:
                    callback(**kwargs)
                except Exception:
                    log.exception("hook %s (%r) failed", point, callback)
            return
        for _, callback, kwargs in entries:
            callback(**kwargs)

    def use(self, cached: "HookMap") -> None:
        """Take the hooks of `cached` (shared by every request with the same config) as
        this request's: `attach` copies them before the first change, so one request's
        additions never reach the others."""
        self._hooks = cached._hooks
        self._shared = True


class Tool:
    """A callable run at one hook point when `tools.<name>.on` is true for the path."""

    def __init__(self, point: str, callable: Callable[..., Any], name: str | None = None,
                 priority: int = 50) -> None:
        if point not in HOOK_POINTS:
            raise ValueError(f"unknown hook point {point!r}; expected one of {HOOK_POINTS}")
        self._point = point
        self.callable = callable
        self._name = name
        self._priority = priority
        self.__doc__ = getattr(callable, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Decorator form: `@tools.NAME(arg=...)` (or bare `@tools.NAME`) on a handler."""
        if args and len(args) == 1 and callable(args[0]) and not kwargs:
            return self._decorate(args[0], {})
        if args:
            raise TypeError(f"tools.{self._name} takes keyword arguments only")

        def decorator(f: Any) -> Any:
            return self._decorate(f, kwargs)

        return decorator

    def _decorate(self, f: Any, kwargs: dict[str, Any]) -> Any:
        conf = f.__dict__.setdefault("_cp_config", {})
        prefix = f"tools.{self._name}."
        conf[prefix + "on"] = True
        for k, v in kwargs.items():
            conf[prefix + k] = v
        return f

    def attach(self, hooks: HookMap, kwargs: dict[str, Any]) -> None:
        """Register this tool's callback on `hooks` with the path's arguments."""
        priority = kwargs.pop("priority", self._priority)
        hooks.attach(self._point, self.callable, priority, **kwargs)


class HandlerTool(Tool):
    """A tool that may answer the request itself (static files): then no handler runs.

    The callable returns True when it produced the response.
    """

    def __init__(self, callable: Callable[..., Any], name: str | None = None,
                 priority: int = 50) -> None:
        super().__init__("before_handler", callable, name, priority)

    def attach(self, hooks: HookMap, kwargs: dict[str, Any]) -> None:
        priority = kwargs.pop("priority", self._priority)
        hooks.attach(self._point, self._wrapper, priority, **kwargs)

    def _wrapper(self, **kwargs: Any) -> None:
        if self.callable(**kwargs):
            serving.request.handler = None

    def handler(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """An exposed handler that runs this tool, for mounting as a tree node."""

        def handle_func(*a: Any, **kw: Any) -> Any:
            if not self.callable(*args, **kwargs):
                raise NotFound()
            return serving.response.body

        handle_func.exposed = True  # type: ignore[attr-defined]
        return handle_func


class Toolbox:
    """The `web.tools` namespace: assigning a Tool names it after the attribute."""

    def __init__(self, namespace: str = "tools") -> None:
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "_tools", {})

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Tool):
            if value._name is None:
                value._name = name
            self._tools[name] = value
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"no tool named {name!r}; known tools: {sorted(self._tools)}")

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def build_hooks(self, config: dict[str, Any]) -> HookMap:
        """The hook map for a merged config: every tool whose `.on` is true, with its args."""
        per_tool: dict[str, dict[str, Any]] = {}
        prefix = self.namespace + "."
        for key, value in config.items():
            if not key.startswith(prefix):
                continue
            parts = key.split(".", 2)
            if len(parts) != 3:
                continue
            per_tool.setdefault(parts[1], {})[parts[2]] = value
        hooks = HookMap()
        for name, args in per_tool.items():
            if not args.pop("on", False):
                continue
            tool = self._tools.get(name)
            if tool is None:
                raise ValueError(f"config enables unknown tool {prefix}{name}")
            tool.attach(hooks, args)
        return hooks
