"""Loading and validating hostsvc's YAML config: listeners, apps and static mounts.

Why a module of its own: every error a user can make in the file must be caught here,
before any process starts, and reported as `FILE:LINE: key.path: expected ..., got ...`.
So YAML is loaded with a SafeLoader subclass that remembers the line of every mapping key
and list item, `${VAR}` / `${VAR:-default}` are expanded from the environment first (in
the raw text, so an expanded `${WORKERS:-2}` is still an integer and lines do not move),
and the schema below fills in defaults so that a two-line app entry works.

This module does no process work and imports no app: `hostsvc.loader` checks imports.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_RUNTIME_DIR = "run"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9090"
METRICS_LISTEN_ENV = "HOSTSVC_METRICS_LISTEN"     # the default of metrics.listen, if set
DEFAULT_METRICS_ALLOW = ["127.0.0.1", "::1"]
ACCESS_LOG_FORMATS = ("json", "text", "off")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SPEC_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
SIZE_RE = re.compile(r"^[0-9]+[kKmMgG]?$")
HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
LISTEN_RE = re.compile(
    r"^(?:(?P<host>[0-9.]+|\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):)?(?P<port>[0-9]{1,5})$")
ALLOW_RE = re.compile(r"^(all|[0-9.]+(/[0-9]{1,2})?|[0-9a-fA-F:]*:[0-9a-fA-F:.]*(/[0-9]{1,3})?)$")
MERGE_TAG = "tag:yaml.org,2002:merge"
VALUE_TAG = "tag:yaml.org,2002:value"
STR_TAG = "tag:yaml.org,2002:str"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")    # fullmatch; POSIX-style names
# Upper bounds that catch a typo (workers: 100000 would fork until the container dies),
# not tuning advice. A worker is a whole process (8.5-11 MiB of its own, 24-29 MiB RSS:
# the engine table in docs/config.md), so 64 already cost 0.5-1.8 GiB for one app, and
# gunicorn's 2-4 workers per core reach 64 only at 16-32 cores. A thread serves one
# request at a time: 256 per worker leave room for apps that mostly wait on I/O.
MAX_WORKERS = 64
MAX_THREADS = 256
ENV_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


class ConfigError(Exception):
    """The config is invalid; `errors` holds one `FILE:LINE: key: message` string each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class AppConfig:
    """One app: what to load, where it is mounted, and its pool's engine and settings."""

    name: str
    prefix: str
    kind: str                      # "root" (object tree) or "wsgi" (any WSGI callable)
    target: str                    # "package.module:attr"
    hosts: list[str] = field(default_factory=list)
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine: str = "gunicorn"       # the pool's server, one of ENGINES
    workers: int = 2
    threads: int = 1
    timeout: float = 30
    graceful_timeout: float = 10
    keepalive: int = 75
    max_requests: int = 0
    max_requests_jitter: int = 0
    worker_lifetime: int = 0       # granian: respawn each worker after N s (0: never)
    env: dict[str, str] = field(default_factory=dict)
    python_path: list[str] = field(default_factory=list)   # absolute, resolved
    client_max_body_size: str = "1m"
    metrics: bool = True           # request metrics (instrument()) in this app's workers
    line: int = 0                  # line of the app entry, for messages
    target_line: int = 0           # line of root:/wsgi:, for import errors
    index: int = 0

    @property
    def upstream_keepalive(self) -> bool:
        """Whether the pool serves more than one request per connection, so nginx should
        keep connections to it open: gunicorn's sync worker closes after each one."""
        return self.engine != "gunicorn" or self.threads > 1

    def fingerprint(self) -> dict[str, Any]:
        """What decides whether a reload must replace this app's pool (lines excluded)."""
        d = asdict(self)
        for k in ("line", "target_line", "index"):
            d.pop(k)
        return d


@dataclass
class StaticMount:
    """A directory nginx serves itself under a prefix."""

    prefix: str
    path: str                      # absolute directory
    hosts: list[str] = field(default_factory=list)
    expires: str | None = None
    line: int = 0


@dataclass
class MetricsConfig:
    """The `metrics:` section: the supervisor's metrics listener and what it counts."""

    listen: str | None = DEFAULT_METRICS_LISTEN   # None: metrics off entirely
    requests: bool = True          # default of every app's request metrics
    expose_on_main: bool = False   # also /metrics, /healthz, /readyz on `listen:`
    allow: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS_ALLOW))
    # Not a YAML key: a secret the supervisor draws each run, which nginx sends with the
    # upstream errors it reports, so nobody else can inflate those counters.
    upstream_token: str = ""

    @property
    def enabled(self) -> bool:
        """Whether the metrics server (and the multiprocess directory) runs at all."""
        return self.listen is not None


@dataclass
class Config:
    """The whole validated file."""

    path: str
    listen: list[str]
    runtime_dir: str
    access_log: str = "json"
    client_max_body_size: str = "1m"
    grace_period: float = 30
    nginx_workers: int | str = "auto"
    apps: list[AppConfig] = field(default_factory=list)
    static: list[StaticMount] = field(default_factory=list)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def app(self, name: str) -> AppConfig | None:
        """The app called `name`, or None."""
        return next((a for a in self.apps if a.name == name), None)


# -- YAML with line numbers --------------------------------------------------------------
class Mapping(dict):
    """A dict that knows the 1-based line of itself and of each of its keys."""

    line: int = 0
    key_lines: dict[Any, int]


class Sequence(list):
    """A list that knows the 1-based line of itself and of each item."""

    line: int = 0
    item_lines: list[int]


class LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and lists record where each key and item was written.

    It also rejects duplicate keys, which plain YAML loading silently collapses, and
    resolves YAML 1.1 merge keys (`<<: *defaults`) itself: PyYAML's own flattening mixes
    merged and explicit keys into one list (so an override looked like a duplicate), and
    since 6.0.3 lets a later mapping in `<<: [*a, *b]` win, where the spec says the
    earlier one does.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Mapping:
        """A Mapping with the line of every key; a repeated key is an error.

        Merged keys are defaults: the mapping's own keys win, then the merged mappings in
        the order listed. A merged key keeps the line where it is written (in the anchored
        mapping), which is where a wrong value or a typo in it has to be fixed.
        """
        result = Mapping()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        merge_line = 0
        sources: list[yaml.Node] = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == MERGE_TAG:
                if merge_line:
                    raise _duplicate("<<", merge_line, key_node)
                merge_line = line
                sources = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                           else [value_node])
                continue
            if key_node.tag == VALUE_TAG:     # a plain `=` key is the string "=", as in
                key_node.tag = STR_TAG        # PyYAML's own flattening
            key = self.construct_object(key_node, deep=True)
            if key in result.key_lines:
                raise _duplicate(key, result.key_lines[key], key_node)
            result.key_lines[key] = line
            result[key] = self.construct_object(value_node, deep=True)
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    None, None, f"expected a mapping or a list of mappings to merge, got "
                    f"{source.id}", source.start_mark)
            merged = self.construct_object(source, deep=True)
            for key, value in merged.items():
                if key not in result:
                    result[key] = value
                    result.key_lines[key] = merged.key_lines[key]
        return result

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> Sequence:
        """A Sequence with the line of every item."""
        result = Sequence(self.construct_object(child, deep=True) for child in node.value)
        result.line = node.start_mark.line + 1
        result.item_lines = [child.start_mark.line + 1 for child in node.value]
        return result


def _duplicate(key: Any, first_line: int, key_node: yaml.Node
               ) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(
        None, None, f"duplicate key {key!r} (first on line {first_line})", key_node.start_mark)


LineLoader.add_constructor("tag:yaml.org,2002:map", LineLoader.construct_mapping)
LineLoader.add_constructor("tag:yaml.org,2002:seq", LineLoader.construct_sequence)


def expand_env(text: str, source: str, environ: dict[str, str] | None = None) -> str:
    """Expand `${VAR}` and `${VAR:-default}` in `text`; `$$` is a literal `$`.

    Done on the raw text so values keep their YAML types; an unset variable without a
    default is an error naming its line. Comments are left as written: a `${VAR}` that
    documents a setting must not need a value.
    """
    env = os.environ if environ is None else environ
    comments = _comment_columns(text, source)
    errors: list[str] = []
    out_lines = []
    for lineno, line in enumerate(text.split("\n"), 1):
        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    errors.append(f"{source}:{lineno}: ${{{name}}} is not set and has no "
                                  f"default (write ${{{name}:-value}})")
                    return ""
                value = default
            if "\n" in value:
                errors.append(f"{source}:{lineno}: ${{{name}}} expands to several lines")
                return ""
            return value
        cut = comments.get(lineno, len(line))
        out_lines.append(ENV_RE.sub(repl, line[:cut]) + line[cut:])
    if errors:
        raise ConfigError(errors)
    return "\n".join(out_lines)


def _comment_columns(text: str, source: str) -> dict[int, int]:
    """{line: column where its comment starts} for the unexpanded `text`.

    YAML's own scanner decides, because a hand-made rule gets quotes wrong: `#` starts a
    comment only after whitespace and outside a quoted or block scalar, yet `it's` opens
    no quote and a quoted scalar may span lines. The scanner emits no comment tokens, but
    everything between two tokens is whitespace or comment, so every `#` found there is in
    a comment. `${...}` is masked with as many `_` first (a default may hold `#`, quotes
    or flow indicators), so the columns are those of `text`.
    """
    masked = "\n".join(ENV_RE.sub(lambda m: "_" * len(m.group(0)), line)
                       for line in text.split("\n"))
    columns: dict[int, int] = {}
    end = 0
    try:
        for token in yaml.scan(masked, Loader=yaml.SafeLoader):
            for hash_at in range(end, token.start_mark.index):
                if masked[hash_at] == "#":
                    line_start = masked.rfind("\n", 0, hash_at) + 1
                    columns.setdefault(masked.count("\n", 0, hash_at) + 1,
                                       hash_at - line_start)
            end = token.end_mark.index
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from None
    return columns


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML into Mapping/Sequence values with lines; syntax errors name the line."""
    try:
        return yaml.load(text, Loader=LineLoader)  # noqa: S506 - LineLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from None


def _syntax_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        return ConfigError([f"{source}:{line}: invalid YAML: {exc.problem or exc}"])
    return ConfigError([f"{source}: invalid YAML: {exc}"])


# -- validation --------------------------------------------------------------------------
class _Checker:
    """Walks the parsed document, collecting every error instead of stopping at the first."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, line: int, key: str, message: str) -> None:
        """Record `FILE:LINE: KEY: message`."""
        self.errors.append(f"{self.source}:{line}: {key}: {message}")

    def unknown_keys(self, mapping: Mapping, allowed: set[str], where: str) -> None:
        """A typo'd key must not be silently ignored: name it and list the valid ones."""
        for key in mapping:
            if key not in allowed:
                self.error(mapping.key_lines[key], f"{where}{key}" if where else str(key),
                           f"unknown key; expected one of: {', '.join(sorted(allowed))}")

    def get(self, mapping: Mapping, key: str, where: str, expect: str, check: Any,
            default: Any) -> Any:
        """mapping[key] checked by `check(value) -> converted or None`, else default."""
        if key not in mapping or mapping[key] is None and default is not None:
            return default
        value = mapping[key]
        converted = check(value)
        if converted is None:
            self.error(mapping.key_lines[key], where + key, f"expected {expect}, got {value!r}")
            return default
        return converted

    def line_of(self, mapping: Mapping, key: str) -> int:
        """The key's line, or the mapping's own when the key is absent."""
        return mapping.key_lines.get(key, mapping.line)

    def resolve_path(self, value: str) -> str:
        """Relative paths in the file are relative to the file, not to the cwd."""
        return str((self.base_dir / os.path.expanduser(value)).resolve())


def _positive_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _non_negative_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _positive_number(v: Any) -> float | None:
    # Finite: .inf passes "> 0" but nginx and gunicorn need a real number of seconds.
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 10 ** 9
    return v if ok else None


def _string(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _size(v: Any) -> str | None:
    v = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    return v if isinstance(v, str) and SIZE_RE.match(v) else None


PREFIX_EXPECTED = ("a URL path starting with '/' (e.g. /blog), without spaces, quotes, "
                   "$, %, ?, ;{}# or '.'/'..' segments")


def _prefix(v: Any) -> str | None:
    if not isinstance(v, str) or not v.startswith("/") or "//" in v:
        return None
    # Characters that nginx would read as syntax or variables ($), or that never match a
    # normalised URI (%, "." and ".." segments).
    if any(c.isspace() or c in "{};#\"'\\?$%" for c in v):
        return None
    if any(seg in (".", "..") for seg in v.split("/")):
        return None
    return v.rstrip("/") or "/"


def _spec(v: Any) -> str | None:
    return v if isinstance(v, str) and SPEC_RE.match(v) else None


def _listen(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        return None
    m = LISTEN_RE.match(v)
    if not m or not 0 < int(m.group("port")) < 65536:
        return None
    return v


def _string_list(v: Any, item_check: Any = _string) -> list[str] | None:
    if not isinstance(v, list):
        v = [v]
    if not isinstance(v, list) or not all(item_check(i) is not None for i in v):
        return None
    return [item_check(i) for i in v]


def _listen_list(v: Any) -> list[str] | None:
    """At least one listener, none twice (nginx falls back to port 80 with none)."""
    found = _string_list(v, _listen)
    return found if found and len(set(found)) == len(found) else None


def _nginx_path(v: Any) -> str | None:
    """A path nginx can take unquoted in `alias`: no whitespace or nginx syntax."""
    if isinstance(v, str) and v and not any(c.isspace() or c in "{};#\"'\\$" for c in v):
        return v
    return None


def _host(v: Any) -> str | None:
    return v.lower() if isinstance(v, str) and HOST_RE.match(v) else None


APP_KEYS = {"name", "prefix", "hosts", "root", "wsgi", "config", "engine", "workers",
            "threads", "timeout", "graceful_timeout", "keepalive", "max_requests",
            "max_requests_jitter", "worker_lifetime", "env", "python_path",
            "client_max_body_size", "metrics"}
ENGINES = ("gunicorn", "granian")
# Settings that only one engine has, and what to use on the other one instead.
ENGINE_ONLY = {
    "keepalive": ("gunicorn", "nginx closes idle connections to granian itself, before "
                              "granian's own 30 s limit; remove keepalive"),
    "max_requests": ("gunicorn", "granian cannot count requests per worker; use "
                                 "worker_lifetime: SECONDS (>= 60) to respawn workers"),
    "max_requests_jitter": ("gunicorn", "remove it (granian has no max_requests)"),
    "worker_lifetime": ("granian", "gunicorn respawns workers by request count; use "
                                   "max_requests: N instead"),
}
TOP_KEYS = {"listen", "runtime_dir", "access_log", "client_max_body_size", "grace_period",
            "nginx_workers", "python_path", "engine", "apps", "static", "metrics"}
METRICS_KEYS = {"listen", "requests", "expose_on_main", "allow"}
STATIC_KEYS = {"prefix", "path", "hosts", "expires"}


def _engine(v: Any) -> str | None:
    return v if v in ENGINES else None


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _allow(v: Any) -> str | None:
    return v if isinstance(v, str) and ALLOW_RE.match(v) else None


def _check_metrics(c: _Checker, doc: Mapping, environ: dict[str, str] | None
                   ) -> MetricsConfig:
    """The `metrics:` section (absent: the defaults; `metrics: off`: no metrics)."""
    env = os.environ if environ is None else environ
    default_listen = env.get(METRICS_LISTEN_ENV) or DEFAULT_METRICS_LISTEN
    if default_listen in ("off", "false"):
        default_listen = None
    elif _listen(default_listen) is None:
        c.error(doc.key_lines.get("metrics", 0), "metrics.listen",
                f"${METRICS_LISTEN_ENV}: expected host:port or off, got {default_listen!r}")
        default_listen = DEFAULT_METRICS_LISTEN
    section = doc.get("metrics")
    if "metrics" not in doc or section is None:
        return MetricsConfig(listen=default_listen)
    if section is False or section == "off":
        return MetricsConfig(listen=None)
    if not isinstance(section, Mapping):
        c.error(doc.key_lines["metrics"], "metrics", f"expected a mapping (listen:, requests:, "
                f"expose_on_main:, allow:) or off, got {section!r}")
        return MetricsConfig(listen=default_listen)
    c.unknown_keys(section, METRICS_KEYS, "metrics.")
    listen: str | None = default_listen
    if "listen" in section:
        raw = section["listen"]
        if raw is False or raw in ("off", "false"):
            listen = None
        else:
            listen = c.get(section, "listen", "metrics.", "host:port, a port, or off "
                           "(e.g. 127.0.0.1:9090)", _listen, default_listen)
            if listen is not None and ":" not in listen.replace("[", "").rsplit("]", 1)[-1]:
                listen = f"127.0.0.1:{listen}"
    metrics = MetricsConfig(
        listen=listen,
        requests=c.get(section, "requests", "metrics.", "true or false", _bool, True),
        expose_on_main=c.get(section, "expose_on_main", "metrics.", "true or false", _bool,
                             False),
        allow=c.get(section, "allow", "metrics.", "a list of addresses or CIDRs "
                    "(e.g. [127.0.0.1, 10.0.0.0/8]) or all", lambda v: _string_list(
                        v, _allow), list(DEFAULT_METRICS_ALLOW)),
    )
    if listen is None and metrics.expose_on_main:
        c.error(c.line_of(section, "expose_on_main"), "metrics.expose_on_main",
                "needs the metrics listener (metrics.listen is off)")
    return metrics


def _check_app(c: _Checker, entry: Any, i: int, line: int, top_paths: list[str],
               body_size: str, request_metrics: bool = True, default_engine: str = "gunicorn"
               ) -> AppConfig | None:
    where = f"apps[{i}]."
    if not isinstance(entry, Mapping):
        c.error(line, f"apps[{i}]", f"expected a mapping with name/prefix and root or wsgi, "
                                    f"got {entry!r}")
        return None
    c.unknown_keys(entry, APP_KEYS, where)
    name = c.get(entry, "name", where, "a lowercase name ([a-z0-9_-], up to 63 chars)",
                 lambda v: v if isinstance(v, str) and NAME_RE.match(v) else None, None)
    prefix = c.get(entry, "prefix", where, PREFIX_EXPECTED, _prefix, None)
    if name is None and prefix is None:
        if "name" not in entry and "prefix" not in entry:
            c.error(entry.line, f"apps[{i}]", "needs a name or a prefix (or both)")
        return None
    if name is None:
        name = prefix.strip("/").replace("/", "-").lower() or "root"
        if not NAME_RE.match(name):
            c.error(c.line_of(entry, "prefix"), where + "prefix",
                    f"cannot derive an app name from {prefix!r}; add name:")
            return None
    if prefix is None:
        prefix = "/" + name
    kinds = [k for k in ("root", "wsgi") if k in entry]
    if len(kinds) != 1:
        c.error(entry.line, f"apps[{i}]", "expected exactly one of root: package.module:Root "
                                         "or wsgi: package.module:app")
        return None
    kind = kinds[0]
    target = c.get(entry, kind, where, "'package.module:attribute'", _spec, None)
    app_cfg = c.get(entry, "config", where, "a mapping of path -> mapping of settings "
                    "(e.g. {'/': {'tools.gzip.on': true}})",
                    lambda v: v if isinstance(v, Mapping) and all(
                        isinstance(k, str) and k.startswith("/") and isinstance(s, Mapping)
                        for k, s in v.items()) else None, {})
    if app_cfg and kind != "root":
        c.error(c.line_of(entry, "config"), where + "config", "only root: apps take a config")
    env = _check_env(c, entry, where)
    paths = c.get(entry, "python_path", where, "a list of directories", _string_list, [])
    engine = c.get(entry, "engine", where, "one of " + ", ".join(ENGINES), _engine,
                   default_engine)
    _check_engine(c, entry, where, engine)
    app = AppConfig(
        name=name, prefix=prefix, kind=kind, target=target or "",
        hosts=c.get(entry, "hosts", where, "a list of host names", lambda v: _string_list(
            v, _host), []),
        config={k: dict(v) for k, v in app_cfg.items()},
        engine=engine,
        workers=_at_most(c, entry, where, "workers", MAX_WORKERS, "worker processes per app",
                         c.get(entry, "workers", where, "a positive integer", _positive_int, 2)),
        threads=_at_most(c, entry, where, "threads", MAX_THREADS, "threads per worker",
                         c.get(entry, "threads", where, "a positive integer", _positive_int, 1)),
        timeout=c.get(entry, "timeout", where, "a positive number of seconds",
                      _positive_number, 30),
        graceful_timeout=c.get(entry, "graceful_timeout", where,
                               "a positive number of seconds", _positive_number, 10),
        keepalive=c.get(entry, "keepalive", where, "a positive integer (seconds)",
                        _positive_int, 75),
        max_requests=c.get(entry, "max_requests", where, "an integer >= 0 (0: never)",
                           _non_negative_int, 0),
        max_requests_jitter=c.get(entry, "max_requests_jitter", where, "an integer >= 0",
                                  _non_negative_int, 0),
        worker_lifetime=c.get(entry, "worker_lifetime", where,
                              "a whole number of seconds >= 60 (0: never)",
                              lambda v: v if isinstance(v, int) and not isinstance(v, bool)
                              and (v == 0 or v >= 60) else None, 0),
        env=env,
        python_path=[c.resolve_path(p) for p in paths] + top_paths,
        client_max_body_size=c.get(entry, "client_max_body_size", where,
                                   "a size like 1m, 512k or 0 (unlimited)", _size, body_size),
        metrics=c.get(entry, "metrics", where, "true or false (request metrics for this app)",
                      _bool, request_metrics),
        line=entry.line, target_line=c.line_of(entry, kind), index=i,
    )
    return app


def _check_env(c: _Checker, entry: Mapping, where: str) -> dict[str, str]:
    """`env:` as strings; a bad name is reported at its own line, here, because the pool
    (and the import check) would only fail later, with the error under root:/wsgi:."""
    env = entry.get("env")
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        c.error(c.line_of(entry, "env"), where + "env",
                f"expected a mapping of NAME: value (scalars), got {env!r}")
        return {}
    result: dict[str, str] = {}
    for name, value in env.items():
        line, key = env.key_lines[name], f"{where}env.{name}"
        if not (isinstance(name, str) and ENV_NAME_RE.fullmatch(name)):
            c.error(line, key, f"expected an environment variable name "
                               f"({ENV_NAME_RE.pattern}), got {name!r}")
        elif isinstance(value, (list, dict)):
            c.error(line, key, f"expected a scalar value, got {value!r}")
        else:
            result[name] = ("" if value is None else str(value).lower()
                            if isinstance(value, bool) else str(value))
    return result


def _at_most(c: _Checker, entry: Mapping, where: str, key: str, limit: int, unit: str,
             value: int) -> int:
    """Report `value` above `limit` (the key's value has passed its type check already)."""
    if value > limit:
        c.error(c.line_of(entry, key), where + key,
                f"expected at most {limit} {unit}, got {value}")
    return value


def _check_engine(c: _Checker, entry: Mapping, where: str, engine: str) -> None:
    """Settings the app's engine does not have are errors, not silently ignored ones."""
    for key in entry:
        only, instead = ENGINE_ONLY.get(key, (engine, ""))
        if only != engine:
            c.error(c.line_of(entry, key), where + key,
                    f"not supported by engine {engine} (only by {only}): {instead}")
    if "engine" in entry:
        _check_installed(c, entry, where, engine)


def _check_installed(c: _Checker, mapping: Mapping, where: str, engine: str) -> None:
    if engine == "granian" and importlib.util.find_spec("granian") is None:
        c.error(c.line_of(mapping, "engine"), where + "engine",
                "engine granian needs the granian package, which is not installed: "
                "pip install 'hostsvc[granian]' (or use engine: gunicorn)")


def _check_static(c: _Checker, entry: Any, i: int, line: int) -> StaticMount | None:
    where = f"static[{i}]."
    if not isinstance(entry, Mapping):
        c.error(line, f"static[{i}]", f"expected a mapping with prefix and path, got {entry!r}")
        return None
    c.unknown_keys(entry, STATIC_KEYS, where)
    for key in ("prefix", "path"):
        if key not in entry:
            c.error(entry.line, f"static[{i}]", f"missing required key {key!r}")
    prefix = c.get(entry, "prefix", where, PREFIX_EXPECTED, _prefix, None)
    path = c.get(entry, "path", where,
                 "a directory path without spaces, quotes, $ or ;{}#", _nginx_path, None)
    if path is not None:
        path = c.resolve_path(path)
        if not os.path.isdir(path):
            c.error(c.line_of(entry, "path"), where + "path",
                    f"expected an existing directory, got {entry['path']!r} ({path})")
    expires = c.get(entry, "expires", where, "an nginx time like 1h, 7d or off",
                    lambda v: v if isinstance(v, str) and re.match(r"^(off|max|[0-9]+[smhdwMy]?)$",
                                                                   v) else None, None)
    if prefix is None or path is None:
        return None
    return StaticMount(prefix=prefix, path=path, expires=expires, line=entry.line,
                       hosts=c.get(entry, "hosts", where, "a list of host names",
                                   lambda v: _string_list(v, _host), []))


def validate(doc: Any, source: str, base_dir: Path | None = None,
             runtime_dir: str | None = None, environ: dict[str, str] | None = None
             ) -> Config:
    """Turn a parsed document into a Config, or raise ConfigError listing every problem.

    `base_dir` (default: the config file's directory) anchors relative paths in the file;
    `runtime_dir` overrides the file's runtime_dir (the CLI's --runtime-dir).
    """
    # abspath, not resolve(): a ConfigMap's file is a symlink into a versioned dir, and
    # relative paths mean "next to the file the user named".
    base = base_dir or Path(os.path.abspath(source)).parent
    c = _Checker(source, base)
    if doc is None:
        doc = Mapping(); doc.line = 1; doc.key_lines = {}
    if not isinstance(doc, Mapping):
        raise ConfigError([f"{source}:1: expected a mapping at the top (listen:, apps:, ...), "
                           f"got {type(doc).__name__}"])
    c.unknown_keys(doc, TOP_KEYS, "")
    listen = c.get(doc, "listen", "", "host:port or a non-empty list of distinct ones "
                   "(e.g. 127.0.0.1:8080)", _listen_list, [DEFAULT_LISTEN])
    rdir = c.get(doc, "runtime_dir", "", "a directory path", _string, DEFAULT_RUNTIME_DIR)
    rdir = runtime_dir or rdir
    body_size = c.get(doc, "client_max_body_size", "", "a size like 1m, 512k or 0",
                      _size, "1m")
    top_paths = [c.resolve_path(p) for p in c.get(doc, "python_path", "",
                                                  "a list of directories", _string_list, [])]
    engine = c.get(doc, "engine", "", "one of " + ", ".join(ENGINES), _engine, "gunicorn")
    _check_installed(c, doc, "", engine)
    cfg = Config(
        path=os.path.abspath(source),
        listen=listen,
        runtime_dir=str(Path(os.path.expanduser(rdir)).resolve()),
        access_log=c.get(doc, "access_log", "", "one of json, text, off",
                         lambda v: v if v in ACCESS_LOG_FORMATS else
                         "off" if v is False else None, "json"),
        client_max_body_size=body_size,
        grace_period=c.get(doc, "grace_period", "", "a positive number of seconds",
                           _positive_number, 30),
        nginx_workers=c.get(doc, "nginx_workers", "", "a positive integer or 'auto'",
                            lambda v: v if v == "auto" else _positive_int(v), "auto"),
        metrics=_check_metrics(c, doc, environ),
    )
    apps = doc.get("apps")
    if "apps" in doc and not isinstance(apps, Sequence):
        c.error(doc.key_lines["apps"], "apps", f"expected a list of apps, got {apps!r}")
    elif apps:
        for i, entry in enumerate(apps):
            app = _check_app(c, entry, i, apps.item_lines[i], top_paths, body_size,
                             cfg.metrics.requests and cfg.metrics.enabled, engine)
            if app:
                cfg.apps.append(app)
    statics = doc.get("static")
    if "static" in doc and not isinstance(statics, Sequence):
        c.error(doc.key_lines["static"], "static",
                f"expected a list of mounts, got {statics!r}")
    elif statics:
        for i, entry in enumerate(statics):
            mount = _check_static(c, entry, i, statics.item_lines[i])
            if mount:
                cfg.static.append(mount)
    if not cfg.metrics.enabled:
        for app in cfg.apps:        # nothing would read their numbers
            app.metrics = False
    _check_unique(c, cfg)
    if c.errors:
        raise ConfigError(c.errors)
    return cfg


def serves(hosts: list[str], server: str) -> bool:
    """Whether a mount declared for `hosts` belongs in nginx's server block `server`.

    A mount without hosts is in every block; a wildcard (`*.example.com`) is also in the
    block of each exact name it covers, since nginx sends such a name to the exact block.
    """
    if not hosts or server in hosts:
        return True
    return any(h.startswith("*.") and server.endswith(h[1:]) for h in hosts)


def _check_unique(c: _Checker, cfg: Config) -> None:
    """Names are unique; a (host, prefix) pair is claimed by one app or mount only."""
    names: dict[str, int] = {}
    for app in cfg.apps:
        if app.name in names:
            c.error(app.line, f"apps[{app.index}].name",
                    f"duplicate app name {app.name!r} (also apps[{names[app.name]}])")
        names.setdefault(app.name, app.index)
    mounts = [(a.prefix, a.hosts, a.line, f"apps[{a.index}]") for a in cfg.apps]
    mounts += [(s.prefix, s.hosts, s.line, f"static[{i}]") for i, s in enumerate(cfg.static)]
    # Judge each server block nginx will get (one per declared host name, or one for
    # all), with the mounts proxy.render puts there: two with one prefix is an error.
    servers = sorted({h for _, hosts, _, _ in mounts for h in hosts}) or ["*"]
    reported: set[str] = set()
    for server in servers:
        seen: dict[str, str] = {}
        for prefix, hosts, line, where in mounts:
            if server != "*" and not serves(hosts, server):
                continue
            other = seen.setdefault(prefix, where)
            if other != where and where not in reported:
                reported.add(where)
                c.error(line, f"{where}.prefix", f"duplicate prefix {prefix!r}"
                        + (f" for host {server!r}" if server != "*" else "") + f" (also {other})")
    if cfg.access_log not in ACCESS_LOG_FORMATS:  # pragma: no cover - guarded by get()
        c.error(0, "access_log", "expected json, text or off")


def load(path: str | os.PathLike[str], runtime_dir: str | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """Read, expand, parse and validate the config file at `path` (raises ConfigError)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config: {exc.strerror or exc}"]) from None
    text = expand_env(text, source, environ)
    return validate(parse_yaml(text, source), source, runtime_dir=runtime_dir,
                    environ=environ)
