"""nginx in front: rendering its config from a hostsvc Config, and controlling the process.

nginx runs as the supervisor's child, non-root capable: `-p RUNTIME -c RUNTIME/nginx.conf
-e stderr`, `daemon off`, pid and every *_temp_path inside the runtime dir, no `user` directive
(unless run as root: see _user_directive).
Routing is by path prefix (longest wins, as nginx prefix locations always do; we also
emit them longest first so the file reads that way), optionally per virtual host.

Each app is an `upstream app_NAME { server unix:SOCKET; }`; a blue/green replacement only
changes the socket path and reloads nginx. A 502 from a pool that is not running
(connection refused, no socket) is turned into a 503 for that prefix only: with metrics
on, nginx hands such a request (and a 504) to the supervisor's metrics server, which
counts it under the app and answers the 503/504 page; with metrics off nginx answers the
503 itself. With metrics on, a loopback-only server exposes stub_status for the scrape.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import AppConfig, Config, MetricsConfig, StaticMount, serves

MIME_TYPES = "/etc/nginx/mime.types"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

JSON_LOG_FORMAT = (
    '{"time":"$time_iso8601","remote_addr":"$remote_addr",'
    '"x_forwarded_for":"$http_x_forwarded_for","host":"$host",'
    '"method":"$request_method","uri":"$request_uri","protocol":"$server_protocol",'
    '"status":$status,"bytes_sent":$body_bytes_sent,"request_time":$request_time,'
    '"upstream_response_time":"$upstream_response_time","app":"$hostsvc_app",'
    '"referer":"$http_referer","user_agent":"$http_user_agent"}'
)


class NginxError(Exception):
    """nginx rejected the config or did not start; the message carries its stderr."""


def nginx_binary() -> str:
    """The nginx executable: PATH first, then Debian's /usr/sbin/nginx."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if not found:
        raise NginxError("nginx is not installed (bash scripts/setup installs it)")
    return found


def _listen_directive(listen: str) -> str:
    return listen if ":" in listen or not listen.isdigit() else f"127.0.0.1:{listen}"


def metrics_address(listen: str) -> str:
    """host:port nginx (and local clients) use to reach the metrics listener `listen`:
    a wildcard address is reached over loopback."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def _app_locations(app: AppConfig, upstream_errors: bool = False) -> list[str]:
    upstream = f"app_{app.name}"
    keepalive = app.upstream_keepalive
    body = [
        f"set $hostsvc_app {app.name};",
        f"proxy_pass http://{upstream};",
        "proxy_redirect off;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Forwarded-Host $http_host;",
        'proxy_set_header X-Request-Start "t=${msec}";',
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";' if keepalive else "proxy_set_header Connection close;",
        "proxy_connect_timeout 5s;",
        f"proxy_read_timeout {int(app.timeout) + 5}s;",
        f"proxy_send_timeout {int(app.timeout) + 5}s;",
        f"client_max_body_size {app.client_max_body_size};",
        "error_page 502 503 504 = @hostsvc_upstream_error;" if upstream_errors else
        "error_page 502 =503 @hostsvc_unavailable;",
    ]
    return _mount(app.prefix, body)


def _static_locations(mount: StaticMount) -> list[str]:
    directory = mount.path.rstrip("/") + "/"
    body = ["set $hostsvc_app static;"]
    body.append(f"root {directory};" if mount.prefix == "/" else f"alias {directory};")
    # No symlinks below the mount (one could point anywhere on the machine), and no
    # dotfiles (.git, .env): what a static directory publishes is its plain files.
    body.append(f"disable_symlinks on from={directory.rstrip('/')};")
    body.append("location ~ /\\. { return 404; }")
    if mount.expires:
        body.append(f"expires {mount.expires};")
    return _mount(mount.prefix, body)


def _mount(prefix: str, body: list[str]) -> list[str]:
    """`location PREFIX/ {body}` plus `/PREFIX` -> `/PREFIX/` (query string kept)."""
    inner = "".join(f"\n            {line}" for line in body)
    if prefix == "/":
        return [f"location / {{{inner}\n        }}"]
    return [f"location = {prefix} {{\n            return 301 {prefix}/$is_args$args;\n        }}",
            f"location {prefix}/ {{{inner}\n        }}"]


UPSTREAM_TOKEN_HEADER = "X-Hostsvc-Upstream-Token"
GRANIAN_UPSTREAM_IDLE = 20     # seconds nginx keeps an idle connection to a granian pool


def _metrics_locations(metrics: MetricsConfig) -> list[str]:
    """With metrics on: the named location nginx's own upstream errors go to and, if
    expose_on_main, /metrics, /healthz and /readyz proxied to the metrics listener."""
    if not metrics.enabled:
        return []
    assert metrics.listen is not None
    address = metrics_address(metrics.listen)
    # $upstream_status, not $status: $status is 000 in a named location (its last code:
    # see the map in render). The method (and body) of the request is passed on.
    # If the metrics server cannot be reached, nginx still answers the plain 503.
    lines = ["location @hostsvc_upstream_error {\n"
             "            recursive_error_pages on;\n"
             "            error_page 502 504 =503 @hostsvc_unavailable;\n"
             + (f"            proxy_set_header {UPSTREAM_TOKEN_HEADER} {metrics.upstream_token};\n"
                if metrics.upstream_token else "") +
             f"            proxy_pass http://{address}/_hostsvc/upstream-error/"
             "$hostsvc_app/$hostsvc_upstream_last;\n"
             "        }"]
    if metrics.expose_on_main:
        rules = "".join(f"\n            allow {a};" for a in metrics.allow) + \
            "\n            deny all;"
        for path in ("/metrics", "/healthz", "/readyz"):
            lines.append(f"location = {path} {{\n            set $hostsvc_app metrics;{rules}"
                         f"\n            proxy_pass http://{address};\n"
                         "        }")
    return lines


def _server(listens: list[str], names: str, default: bool, apps: list[AppConfig],
            statics: list[StaticMount], metrics: MetricsConfig | None = None) -> str:
    metrics = metrics or MetricsConfig(listen=None)
    flag = " default_server" if default else ""
    lines = [f"listen {_listen_directive(ls)}{flag};" for ls in listens]
    lines.append(f"server_name {names};")
    lines.append("set $hostsvc_app -;")
    mounts: list[tuple[str, list[str]]] = [(a.prefix, _app_locations(a, metrics.enabled))
                                           for a in apps]
    mounts += [(s.prefix, _static_locations(s)) for s in statics]
    mounts.sort(key=lambda m: (-len(m[0]), m[0]))
    for _, locations in mounts:
        lines.extend(locations)
    if not any(prefix == "/" for prefix, _ in mounts):
        lines.append("location / {\n            return 404;\n        }")
    lines.append("location @hostsvc_unavailable {\n"
                 "            default_type text/plain;\n"
                 "            add_header Retry-After 5 always;\n"
                 '            return 503 "503 Service Unavailable: this app is not running\\n";\n'
                 "        }")
    lines.extend(_metrics_locations(metrics))
    body = "".join(f"\n        {line}" for line in lines)
    return f"    server {{{body}\n    }}\n"


def _status_server(port: int) -> str:
    """stub_status on a loopback-only server of its own (read by the metrics scrape)."""
    return ("    server {\n"
            f"        listen 127.0.0.1:{port};\n"
            "        server_name _;\n        set $hostsvc_app -;\n        access_log off;\n"
            "        location = /nginx_status {\n            stub_status;\n"
            "            allow 127.0.0.1;\n            deny all;\n        }\n"
            "        location / {\n            return 404;\n        }\n    }\n")


def render(cfg: Config, sockets: dict[str, str], runtime_dir: str,
           status_port: int | None = None) -> str:
    """nginx.conf text for `cfg`, with app NAME's upstream at `sockets[NAME]`.

    `status_port` says the supervisor's metrics server runs: nginx then gets a loopback
    stub_status server on that port and sends upstream errors to the metrics server.
    Without it (metrics off) nginx answers a down app's 503 itself.
    """
    if status_port is None and cfg.metrics.enabled:
        cfg = replace(cfg, metrics=replace(cfg.metrics, listen=None))
    rd = runtime_dir.rstrip("/")
    temp = "".join(f"    {kind}_temp_path {rd}/nginx/{kind};\n" for kind in TEMP_DIRS)
    mime = f"    include {MIME_TYPES};\n" if os.path.exists(MIME_TYPES) else \
        "    types { text/html html; text/css css; application/javascript js; }\n"
    if cfg.access_log == "json":
        access = (f"    log_format hostsvc_json escape=json '{JSON_LOG_FORMAT}';\n"
                  "    access_log /dev/stdout hostsvc_json;\n")
    elif cfg.access_log == "text":
        access = "    access_log /dev/stdout combined;\n"
    else:
        access = "    access_log off;\n"
    upstreams = ""
    for app in cfg.apps:
        keepalive = "\n        keepalive 16;" if app.upstream_keepalive else ""
        if app.engine == "granian":
            # granian drops a connection idle for 30 s (its header read timeout); nginx
            # must let go first, or a request it sends as granian closes fails.
            keepalive += f"\n        keepalive_timeout {GRANIAN_UPSTREAM_IDLE}s;"
        upstreams += (f"    upstream app_{app.name} {{\n        server unix:{sockets[app.name]} "
                      f"fail_timeout=0;{keepalive}\n    }}\n")
    if cfg.metrics.enabled:
        # $upstream_status lists every try ("502, 502" when nginx retried on a second
        # cached connection): the upstream-error location reports the last one.
        upstreams += ("    map $upstream_status $hostsvc_upstream_last {\n"
                      '        "~(?<last>[0-9]+)$" $last;\n'
                      "        default $upstream_status;\n    }\n")
    hosts = sorted({h for m in [*cfg.apps, *cfg.static] for h in m.hosts})
    if not hosts:
        servers = _server(cfg.listen, "_", True, cfg.apps, cfg.static, cfg.metrics)
    else:
        # Apps that declare hosts answer only there; the rest answer on every declared
        # host; any other Host gets its connection closed (444).
        servers = "".join(
            _server(cfg.listen, host, False,
                    [a for a in cfg.apps if serves(a.hosts, host)],
                    [s for s in cfg.static if serves(s.hosts, host)], cfg.metrics)
            for host in hosts)
        servers += "    server {\n" + "".join(
            f"        listen {_listen_directive(ls)} default_server;\n" for ls in cfg.listen
        ) + "        server_name _;\n        set $hostsvc_app -;\n        return 444;\n    }\n"
    if status_port:
        servers += _status_server(status_port)
    workers = cfg.nginx_workers
    return (
        "# Generated by hostsvc from " + cfg.path + "; edits are overwritten.\n"
        f"{_user_directive()}daemon off;\nmaster_process on;\nworker_processes {workers};\n"
        f"pid {rd}/nginx.pid;\nerror_log stderr warn;\n"
        f"worker_shutdown_timeout {int(cfg.grace_period)}s;\n"
        "events {\n    worker_connections 1024;\n}\n"
        "http {\n"
        f"{temp}{mime}    default_type application/octet-stream;\n"
        "    sendfile on;\n    tcp_nopush on;\n    server_tokens off;\n"
        "    keepalive_timeout 65s;\n    absolute_redirect off;\n"
        f"    client_max_body_size {cfg.client_max_body_size};\n"
        f"{access}{upstreams}{servers}}}\n"
    )


def _user_directive() -> str:
    """None when not root (nginx could not switch users anyway). As root, nginx would run
    its workers as `nobody`, who cannot reach the pools' sockets in a private runtime dir:
    name the supervisor's own user, the one the pools run as."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name};\n"


class Nginx:
    """The nginx master process, run in the foreground as a child of the supervisor."""

    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.conf_path = os.path.join(runtime_dir, "nginx.conf")
        self.pid_path = Path(runtime_dir, "nginx.pid")       # as render() writes it
        self.proc: subprocess.Popen[bytes] | None = None

    def _args(self, conf: str) -> list[str]:
        return [nginx_binary(), "-p", self.runtime_dir, "-c", conf, "-e", "stderr"]

    def write_config(self, text: str) -> None:
        """`nginx -t` the text in a scratch file, then move it into place atomically."""
        for kind in TEMP_DIRS:
            Path(self.runtime_dir, "nginx", kind).mkdir(parents=True, exist_ok=True)
        candidate = self.conf_path + ".new"
        # 0600: it holds the metrics upstream token, and nginx reads it as this user.
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        proc = subprocess.run(self._args(candidate) + ["-t", "-q"], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise NginxError(f"nginx -t rejected the generated config ({candidate}): "
                             + " ".join(proc.stderr.split()))
        os.replace(candidate, self.conf_path)

    @property
    def pid(self) -> int | None:
        """The master's pid, None before start()."""
        return self.proc.pid if self.proc else None

    def start(self, preexec_fn: Callable[[], None] | None = None,
              timeout: float = 10) -> None:
        """Start nginx on the written config; return once it listens on every address.

        The sign is nginx's pid file: nginx writes it only after it has bound and is
        listening on all its sockets. (Connecting to the port proves nothing: someone
        else may hold it while nginx retries bind() and then gives up.)
        """
        self.pid_path.unlink(missing_ok=True)
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # then drains nginx gracefully instead of nginx dying on SIGINT.
        self.proc = subprocess.Popen(self._args(self.conf_path), stdin=subprocess.DEVNULL,
                                     preexec_fn=preexec_fn, process_group=0)
        deadline = time.monotonic() + timeout
        while self._pid_file() != self.proc.pid:
            if self.proc.poll() is not None:
                raise NginxError(f"nginx exited with status {self.proc.returncode} at start "
                                 "(see its error above: a port in use?)")
            if time.monotonic() > deadline:
                self.stop(graceful=False)
                raise NginxError(f"nginx did not start listening within {timeout}s")
            time.sleep(0.05)

    def _pid_file(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        """Whether the master still runs."""
        return self.proc is not None and self.proc.poll() is None

    def reload(self) -> None:
        """Graceful reload (what `nginx -s reload` sends): new workers, old ones drain."""
        if self.alive():
            self.proc.send_signal(signal.SIGHUP)

    def stop(self, graceful: bool = True) -> None:
        """SIGQUIT: stop listening, finish in-flight requests; SIGTERM: fast."""
        if self.alive():
            self.proc.send_signal(signal.SIGQUIT if graceful else signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """Wait for nginx to exit; True if it did."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
