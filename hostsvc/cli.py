"""The `hostsvc` command: run, check, reload, status.

Kept thin: `run` hands over to the Supervisor, `check` to config validation plus the
import check, and `reload`/`status` talk to a running supervisor only through its
documented local interface (RUNTIME/hostsvc.pid and RUNTIME/state.json).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import config as configmod
from .config import ConfigError

DEFAULT_CONFIG = "config/hostsvc.yaml"

EPILOG = """\
commands:
  run [CONFIG]      start nginx and one gunicorn pool per app, supervise them
                    (restart crashed pools, SIGHUP reloads, SIGTERM drains and stops)
  check CONFIG      validate CONFIG and import every app; exit 1 on errors
  reload [CONFIG]   validate, then ask the running supervisor to reload its config
                    (blue/green: no request is dropped); prints the outcome
  status            print every app's prefix, pid, workers, restarts and state
                    (and request counts, read from the metrics listener)

examples:
  hostsvc run                                   serve config/hostsvc.yaml
  hostsvc run config/hostsvc.yaml --watch       also reload when the file changes
                                                (e.g. a Kubernetes ConfigMap update)
  hostsvc check config/hostsvc.yaml             validate before deploying
  hostsvc reload                                after editing the config
  kill -HUP $(cat run/hostsvc.pid)              same as hostsvc reload
  hostsvc status --runtime-dir run              what is running
  hostsvc status --json                         the raw state.json

The runtime dir (sockets, nginx.conf, state.json, hostsvc.pid) is the config's
runtime_dir (default ./run), or --runtime-dir; status and reload also look at
$HOSTSVC_RUNTIME_DIR. Config reference: docs/config.md.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hostsvc` console script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="hostsvc", description="Host many Python web apps behind one nginx, each app "
        "in its own gunicorn pool, driven by one YAML file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="start and supervise everything (foreground)",
                       description="Start nginx and every app's pool; supervise until "
                       "SIGTERM/SIGINT. SIGHUP reloads the config.")
    p.add_argument("config", nargs="?", default=os.environ.get("HOSTSVC_CONFIG", DEFAULT_CONFIG),
                   help=f"YAML config file (default $HOSTSVC_CONFIG, else {DEFAULT_CONFIG})")
    p.add_argument("--runtime-dir", help="override the config's runtime_dir")
    p.add_argument("--watch", action="store_true", help="reload when the config file's "
                   "content changes (polled every 0.25 s; symlink swaps included)")

    p = sub.add_parser("check", help="validate a config and import its apps",
                       description="Validate CONFIG (types, unknown keys, duplicates, "
                       "imports); print FILE:LINE: KEY: problem lines; exit 1 on errors.")
    p.add_argument("config", nargs="?", default=os.environ.get("HOSTSVC_CONFIG", DEFAULT_CONFIG),
                   help=f"default $HOSTSVC_CONFIG, else {DEFAULT_CONFIG}")
    p.add_argument("--no-import", action="store_true", help="skip importing the apps")

    p = sub.add_parser("reload", help="reload a running supervisor's config",
                       description="Validate CONFIG, then SIGHUP the supervisor that runs "
                       "it and wait for the outcome in state.json.")
    p.add_argument("config", nargs="?", default=None,
                   help="config file (default: the one the supervisor runs)")
    p.add_argument("--runtime-dir", help="where the supervisor runs (default: from CONFIG, "
                   "else $HOSTSVC_RUNTIME_DIR, else ./run)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait (default 120)")

    p = sub.add_parser("status", help="show apps, pids, workers, restarts, state",
                       description="Print the running supervisor's RUNTIME/state.json.")
    p.add_argument("--runtime-dir", default=None,
                   help="default: $HOSTSVC_RUNTIME_DIR, else ./run")
    p.add_argument("--json", action="store_true", help="print state.json as is")

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return {"run": cmd_run, "check": cmd_check, "reload": cmd_reload,
            "status": cmd_status}[args.command](args)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hostsvc: %(message)s"))
    root = logging.getLogger("hostsvc")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    """`hostsvc run`: the supervisor in the foreground."""
    from .supervisor import Supervisor

    _setup_logging()
    return Supervisor(args.config, args.runtime_dir, watch=args.watch).run()


def cmd_check(args: argparse.Namespace) -> int:
    """`hostsvc check`: every error at once, FILE:LINE: KEY: message."""
    from .pool import check_apps

    try:
        cfg = configmod.load(args.config)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    errors = [] if args.no_import else check_apps(cfg.apps, args.config)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"{args.config}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{args.config}: ok ({len(cfg.apps)} apps, {len(cfg.static)} static mounts, "
          f"listening on {', '.join(cfg.listen)})")
    return 0


def _runtime_dir(args: argparse.Namespace) -> str:
    if args.runtime_dir:
        return args.runtime_dir
    if getattr(args, "config", None):
        try:
            return configmod.load(args.config).runtime_dir
        except ConfigError:
            pass
    return _default_runtime_dir()


def _default_runtime_dir() -> str:
    """Where to look for a running supervisor when nothing else says: a container's
    entrypoint exports HOSTSVC_RUNTIME_DIR, so `hostsvc status` works there as is."""
    return os.environ.get("HOSTSVC_RUNTIME_DIR") or configmod.DEFAULT_RUNTIME_DIR


def read_state(runtime_dir: str) -> dict[str, Any] | None:
    """RUNTIME/state.json, or None if there is none (never started here)."""
    try:
        return json.loads(Path(runtime_dir, "state.json").read_text())
    except (OSError, ValueError):
        return None


def _supervisor_pid(runtime_dir: str) -> int | None:
    try:
        pid = int(Path(runtime_dir, "hostsvc.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def cmd_reload(args: argparse.Namespace) -> int:
    """`hostsvc reload`: validate first (so a typo never reaches the supervisor), HUP, wait."""
    from .pool import check_apps

    runtime_dir = _runtime_dir(args)
    pid = _supervisor_pid(runtime_dir)
    state = read_state(runtime_dir)
    if pid is None or state is None:
        print(f"hostsvc: no supervisor running in {runtime_dir}", file=sys.stderr)
        return 1
    running = state.get("config_path")
    config = args.config or running
    if args.config and running and os.path.abspath(args.config) != running:
        print(f"hostsvc: the supervisor runs {running}; edit that file (or restart with "
              f"{args.config})", file=sys.stderr)
        return 1
    try:
        cfg = configmod.load(config)
        errors = check_apps(cfg.apps, config)
    except ConfigError as exc:
        errors = exc.errors
    if errors:
        print("\n".join(errors) + "\nhostsvc: not reloading: fix the errors above",
              file=sys.stderr)
        return 1
    before = (state.get("last_reload") or {}).get("at")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        last = (read_state(runtime_dir) or {}).get("last_reload") or {}
        if last.get("at") and last.get("at") != before:
            print(f"hostsvc: reload {'ok' if last['ok'] else 'FAILED'}: {last['message']}")
            return 0 if last["ok"] else 1
    print("hostsvc: sent SIGHUP, but no reload result within the timeout", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    """`hostsvc status`: a table from state.json; exit 1 if no supervisor runs."""
    runtime_dir = args.runtime_dir or _default_runtime_dir()
    state = read_state(runtime_dir)
    if state is None:
        print(f"hostsvc: no state.json in {runtime_dir} (not started here?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    pid = _supervisor_pid(runtime_dir)
    url = (state.get("metrics") or {}).get("url")
    counts = request_counts(url) if pid is not None and url else None
    print(format_status(state, running=pid is not None, requests=counts))
    return 0 if pid is not None else 1


def request_counts(url: str, timeout: float = 2.0) -> dict[str, dict[str, float]] | None:
    """{app: {"total": n, "5xx": n}} from the running metrics listener, None if it does
    not answer (status then prints the table alone)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
        from prometheus_client.parser import text_string_to_metric_families
        counts: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name not in ("hostsvc_http_requests", "hostsvc_http_requests_total"):
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                app = counts.setdefault(sample.labels.get("app", "?"),
                                        {"total": 0.0, "5xx": 0.0})
                app["total"] += sample.value
                if sample.labels.get("code_class") == "5xx":
                    app["5xx"] += sample.value
        return counts
    except (OSError, ValueError):
        return None


def format_status(state: dict[str, Any], running: bool = True,
                  requests: dict[str, dict[str, float]] | None = None) -> str:
    """The human-readable status table (plus request counts, when given)."""
    nginx = state.get("nginx") or {}
    head = (f"supervisor pid {state.get('supervisor_pid')} "
            f"{'running' if running else 'NOT RUNNING (stale state)'}; "
            f"config {state.get('config_path')}; listening on "
            f"{', '.join(state.get('listen') or [])}; nginx pid {nginx.get('pid')} "
            f"{nginx.get('state')}")
    rows = [("APP", "PREFIX", "PID", "WORKERS", "RESTARTS", "STATE")]
    for name, app in sorted((state.get("apps") or {}).items()):
        rows.append((name, app["prefix"], str(app.get("pid") or "-"),
                     f"{app.get('workers_alive', 0)}/{app.get('workers')}",
                     str(app.get("restarts", 0)), app.get("state", "?")
                     + (f" ({app['last_error']})" if app.get("last_error") else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows]
    last = state.get("last_reload")
    tail = [f"last reload: {'ok' if last['ok'] else 'FAILED'} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['at']))}: "
            f"{last['message']}"] if last else []
    if requests is not None:
        counted = ", ".join(f"{name} {int(c['total'])} ({int(c['5xx'])} 5xx)"
                            for name, c in sorted(requests.items())) or "none yet"
        tail.append(f"requests since start: {counted}")
    return "\n".join([head, *lines, *tail])


if __name__ == "__main__":
    sys.exit(main())
