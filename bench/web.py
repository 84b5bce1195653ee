"""The framework benchmark (issue #2, speed): is hostsvc.web cheap enough to serve?

One command serves each app of ``bench/apps.py`` on gunicorn (sync, 2 workers), on
granian (2 workers, issue #7's fast engine; the raw and hostsvc.web apps only) and on
CherryPy's own server (10 threads), loads them with wrk on loopback in interleaved
rounds, and prints requests/s, p50 and p99 per row, the ratios the issues set targets
for, and the framework's own cost per request measured in-process (no server, no
sockets), which is the number the framework owner can act on.

    .venv/bin/python bench/web.py [--duration 8] [--connections 32] [--granian-threads 1]
                                  [--quick] [--profile]

Only ratios within one run mean anything: absolute req/s move with machine load.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Callable, Iterator

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import apps  # noqa: E402  (bench/ is not a package; the servers import it the same way)

HELLO_PATH = "/"
ITEM_PATH = "/item/42?q=x"
TARGET_B_OVER_A = 0.8
TARGET_B_OVER_CHERRYPY = 2.0
# Issue #7: on granian the server costs so little that the framework's cost shows.
TARGET_B_OVER_A_GRANIAN = 0.5
# Python threads per granian worker. One, like a gunicorn sync worker: the bench apps
# never block, so more threads only contend for the GIL (see bench/README.md).
GRANIAN_THREADS = 1
# More distinct /item/<id> URLs than hostsvc.web's per-URL route cache keeps (4096 today).
DISTINCT_IDS = 10_000


@dataclass(frozen=True)
class Case:
    """One app at one URL: a row of the table, served on each server."""

    key: str
    label: str
    app: str
    path: str
    expect: bytes


CASES = (
    Case("a", "raw WSGI hello", "raw", HELLO_PATH, apps.HELLO),
    Case("b", "hostsvc.web hello", "hostsvc", HELLO_PATH, apps.HELLO),
    Case("c", "hostsvc.web path+query", "hostsvc", ITEM_PATH, b"item 42 q=x"),
    Case("d", "CherryPy hello", "cherrypy", HELLO_PATH, apps.HELLO),
    Case("e", "CherryPy path+query", "cherrypy", ITEM_PATH, b"item 42 q=x"),
)
SERVERS = ("gunicorn", "granian", "cherrypy")
SERVER_LABELS = {"gunicorn": "gunicorn sync x2", "granian": "granian wsgi x2",
                 "cherrypy": "CherryPy server x10"}
# The rows each server runs: issue #7 asks granian for the raw and hostsvc.web rows only.
SERVER_CASES = {"gunicorn": "abcde", "granian": "abc", "cherrypy": "abcde"}


@dataclass
class Result:
    """What wrk measured for one case on one server: medians of the rounds, the range of
    req/s over the rounds (how much the machine moved), and all errors."""

    case: Case
    server: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rps_low: float
    rps_high: float


# -- servers ---------------------------------------------------------------------------
def free_port() -> int:
    """A port nothing listens on now (the OS picks it; a race is possible but harmless here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server: str, app: str, port: int,
                   granian_threads: int = GRANIAN_THREADS) -> list[str]:
    """The command line that serves `app` on `server` at 127.0.0.1:`port`.

    Each server runs as its own process group leader (an arbiter must not share our
    signals) with its access log off (the default of both). gunicorn gets no control
    socket, so concurrent arbiters of other engineers on this machine are not disturbed.
    granian gets `granian_threads` blocking threads per worker (its default for WSGI is
    hundreds, and it warns about that) and no websockets, which WSGI cannot use.
    """
    if server == "gunicorn":
        return [sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "sync",
                "--bind", f"127.0.0.1:{port}", "--pythonpath", str(BENCH_DIR),
                "--no-control-socket", "--graceful-timeout", "3", "--log-level", "warning",
                f"apps:{apps.APP_SPECS[app]}"]
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "wsgi", "--workers", "2",
                "--blocking-threads", str(granian_threads), "--host", "127.0.0.1",
                "--port", str(port), "--no-ws", "--log-level", "warning",
                "--working-dir", str(BENCH_DIR), f"apps:{apps.APP_SPECS[app]}"]
    return [sys.executable, str(BENCH_DIR / "apps.py"), app, str(port)]


def wait_ready(url: str, expect: bytes, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Block until the server answers `url` with the expected body, so wrk never measures
    start-up, and a wrong answer fails loudly instead of being benchmarked."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = resp.read()
            if body != expect:
                raise RuntimeError(f"{url} answered {body!r}, expected {expect!r}")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after {timeout:.0f} s") from None
            time.sleep(0.1)


@contextlib.contextmanager
def serving(server: str, app: str, probe: Case, granian_threads: int = GRANIAN_THREADS
            ) -> Iterator[int]:
    """Run one server in its own process group for the duration of the block; yield its port.

    Stopping sends SIGTERM to that group (gunicorn's and granian's graceful stop,
    CherryPy's engine exit) and SIGKILLs it only if it lingers, so no server outlives
    the benchmark.
    """
    port = free_port()
    proc = subprocess.Popen(server_command(server, app, port, granian_threads),
                            cwd=BENCH_DIR.parent,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}{probe.path}", probe.expect, proc)
        yield port
    finally:
        stop_group(proc, timeout=10)


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group led by `proc` (a graceful stop), SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- load ------------------------------------------------------------------------------
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS_MS[unit]


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """(req/s, p50 ms, p99 ms, errors) from `wrk --latency` output.

    Errors are socket errors plus non-2xx/3xx answers: a fast run full of errors is not
    a fast server, so they are shown next to the figures.
    """
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    return rps, p50, p99, errors


def run_wrk(url: str, seconds: int, connections: int) -> str:
    """One wrk run with one thread, as the shared baselines were measured, so they compare."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    return subprocess.run(cmd, check=True, capture_output=True, text=True,
                          timeout=seconds + 30).stdout


def measure_servers(duration: int, connections: int, warmup: int,
                    granian_threads: int = GRANIAN_THREADS) -> list[Result]:
    """Every server's cases, the load interleaved in `duration` rounds of 1 s.

    All servers start first (idle workers cost nothing); then each round gives every
    row one second in turn. Other work on the machine comes and goes, so measuring row
    after row would charge a burst of it to whichever row ran then; interleaving spreads
    it over all rows, which keeps the ratios honest. Each round starts one row later, so
    no row always runs right after the same server and inherits what that one leaves
    behind (connections closing, threads winding down). A row's figures are the median
    of its rounds. One second is enough per slice: sync workers have no keep-alive, so
    every request opens its own connection, and granian's 32 kept-alive connections are
    opened once at the start of the slice, so there is no ramp-up to amortise.
    """
    targets = [(server, case) for server in SERVERS for case in CASES
               if case.key in SERVER_CASES[server]]
    samples: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    with contextlib.ExitStack() as stack:
        ports = {}
        for server in SERVERS:
            for app in dict.fromkeys(case.app for s, case in targets if s == server):
                probe = next(c for c in CASES if c.app == app)
                ports[server, app] = stack.enter_context(
                    serving(server, app, probe, granian_threads))
        urls = {(server, case.key): f"http://127.0.0.1:{ports[server, case.app]}{case.path}"
                for server, case in targets}
        if warmup:
            for url in urls.values():
                run_wrk(url, warmup, connections)
        for round_no in range(duration):
            shift = round_no % len(targets)
            for server, case in targets[shift:] + targets[:shift]:
                out = run_wrk(urls[server, case.key], 1, connections)
                samples.setdefault((server, case.key), []).append(parse_wrk(out))
    results = []
    for server, case in targets:
        runs = samples[server, case.key]
        results.append(Result(case, server, median(r[0] for r in runs),
                              median(r[1] for r in runs), median(r[2] for r in runs),
                              sum(r[3] for r in runs), min(r[0] for r in runs),
                              max(r[0] for r in runs)))
    return results


def format_row(r: Result) -> str:
    """One table line; the smoke test parses `<key> ... <req/s> req/s`."""
    return (f"{r.case.key}  {r.case.label:<24} {SERVER_LABELS[r.server]:<20} "
            f"{r.case.path:<14} {r.rps:>10.1f} req/s  p50 {r.p50_ms:>7.2f} ms  "
            f"p99 {r.p99_ms:>8.2f} ms  errors {r.errors}  "
            f"rounds {r.rps_low:.0f}-{r.rps_high:.0f}")


def ratio_lines(results: list[Result]) -> list[str]:
    """The ratios issues #2 and #7 ask for, with PASS/MISS where they set a target."""
    rps = {(r.case.key, r.server): r.rps for r in results}

    def line(name: str, num: tuple[str, str], den: tuple[str, str],
             target: float | None) -> str:
        value = rps[num] / rps[den] if rps[den] else float("inf")
        verdict = "info" if target is None else ("PASS" if value >= target else "MISS")
        goal = f"target >= {target:.2f}" if target is not None else "no target"
        return f"ratio {name:<50} {value:6.2f}x  {goal:<14} {verdict}"

    g, gr, c = "gunicorn", "granian", "cherrypy"
    return [
        line("b/a  hostsvc hello / raw WSGI (granian)", ("b", gr), ("a", gr),
             TARGET_B_OVER_A_GRANIAN),
        line("c/a  hostsvc path+query / raw WSGI (granian)", ("c", gr), ("a", gr), None),
        line("a/a  raw WSGI, granian / gunicorn", ("a", gr), ("a", g), None),
        line("b/a  hostsvc hello / raw WSGI (gunicorn)", ("b", g), ("a", g), TARGET_B_OVER_A),
        line("c/a  hostsvc path+query / raw WSGI (gunicorn)", ("c", g), ("a", g), None),
        line("b/d  hostsvc hello / CherryPy hello (gunicorn)", ("b", g), ("d", g),
             TARGET_B_OVER_CHERRYPY),
        line("c/e  hostsvc p+q / CherryPy p+q (gunicorn)", ("c", g), ("e", g), None),
        line("a/d  ceiling of b/d: a zero-cost framework", ("a", g), ("d", g), None),
        line("b/d' hostsvc (gunicorn) / CherryPy own server", ("b", g), ("d", c), None),
        line("d'/d CherryPy own server / CherryPy on gunicorn", ("d", c), ("d", g), None),
    ]


# -- in-process framework cost ---------------------------------------------------------
def base_environ(path: str) -> dict[str, Any]:
    """The environ a WSGI server would build for GET `path`, with a Host and a User-Agent."""
    path_info, _, query = path.partition("?")
    return {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path_info,
        "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "bench", "HTTP_ACCEPT": "*/*",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }


def granian_environ_extra() -> dict[str, Any]:
    """What granian adds to every environ besides the request: a copy of the worker's
    whole os.environ (granian 2.8's wsgi.py), plus its own constants."""
    return {**os.environ, "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_SOFTWARE": "Granian",
            "wsgi.input_terminated": True}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None
                    ) -> Callable[[bytes], None]:
    return _write


def _write(data: bytes) -> None:
    """WSGI's legacy write(); none of the apps use it."""


def make_caller(app: apps.WSGIApp, path: str, distinct_ids: int = 0,
                extra_environ: dict[str, Any] | None = None) -> Callable[[], None]:
    """One request as a server performs it: a fresh environ and wsgi.input, the body
    iterated and closed. The raw app pays the same, so subtracting it leaves the framework.

    With `distinct_ids`, the path's last segment cycles through that many ids
    (`/item/0`, `/item/1`, ...): real traffic to `/item/<id>` rarely repeats a URL, so
    this shows what a per-URL cache in the framework is worth when it misses.
    `extra_environ` goes under the request's own keys (see `granian_environ_extra`).
    """
    base = {**(extra_environ or {}), **base_environ(path)}
    bytes_io = io.BytesIO
    prefix = base["PATH_INFO"].rpartition("/")[0]
    path_infos = itertools.cycle([f"{prefix}/{i}" for i in range(distinct_ids)]
                                 or [base["PATH_INFO"]])

    def call() -> None:
        environ = dict(base)
        environ["PATH_INFO"] = next(path_infos)
        environ["wsgi.input"] = bytes_io(b"")
        body = app(environ, _start_response)
        for _ in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()

    return call


def time_per_call_us(call: Callable[[], None], seconds: float, repeats: int = 5) -> float:
    """Best-of-`repeats` microseconds per call, each repeat lasting about `seconds`.

    The minimum is the figure least disturbed by the other work on this machine.
    """
    for _ in range(200):
        call()
    n, elapsed = 0, 0.0
    start = time.perf_counter()
    while elapsed < seconds / 5:
        call()
        n += 1
        elapsed = time.perf_counter() - start
    iterations = max(100, int(n * seconds / elapsed))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            call()
        best = min(best, (time.perf_counter() - start) / iterations)
    return best * 1e6


def framework_costs(seconds: float) -> list[str]:
    """Per-request cost of each framework over the raw WSGI app, in microseconds."""
    loaded = {name: apps.load(name) for name in apps.APP_SPECS}
    raw_us = time_per_call_us(make_caller(loaded["raw"], HELLO_PATH), seconds)
    lines = [f"us/call  a  {'raw WSGI hello':<24} {raw_us:8.2f} us  (the floor, subtracted below)"]
    runs = [(case.key + " ", case.label, case, 0) for case in CASES[1:]]
    runs += [(case.key + "'", "  ... a new id per call", case, DISTINCT_IDS)
             for case in CASES if case.path == ITEM_PATH]
    for key, label, case, ids in runs:
        total = time_per_call_us(make_caller(loaded[case.app], case.path, ids), seconds)
        lines.append(f"us/call  {key} {label:<24} {total:8.2f} us  "
                     f"framework cost {total - raw_us:8.2f} us/request")
    # Row b with tools.proxy on (as hostsvc mounts every tree), bare granian's environ
    # (the raw app is timed again with that environ, since copying it costs too).
    extra = granian_environ_extra()
    raw_g = time_per_call_us(make_caller(loaded["raw"], HELLO_PATH, 0, extra), seconds)
    total = time_per_call_us(make_caller(loaded["hostsvc-proxied"], HELLO_PATH, 0, extra),
                             seconds)
    lines.append(f"us/call  b* {'  ... proxy, granian env':<24} {total:8.2f} us  "
                 f"framework cost {total - raw_g:8.2f} us/request  (raw {raw_g:.2f} us, "
                 f"{len(extra)} keys added)")
    return lines


def profile(case: Case, calls: int, top: int = 15) -> str:
    """cProfile's top functions by own time for `calls` requests of `case`."""
    call = make_caller(apps.load(case.app), case.path)
    for _ in range(200):
        call()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark and print its report; the exit status is 0 unless it broke
    (a MISS is a finding to read, not a failure of the run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds of load per row")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--granian-threads", type=int, default=GRANIAN_THREADS,
                        help=f"blocking threads per granian worker (default {GRANIAN_THREADS})")
    parser.add_argument("--quick", action="store_true",
                        help="1 s per row, no warm-up run, short in-process timing (smoke test)")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile top-15 (tottime) for rows b and c")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (scripts/setup --test installs it)")
    duration, warmup, timing_s = (1, 0, 0.05) if args.quick else (args.duration, 1, 0.5)

    print(f"hostsvc.web framework benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  "
          f"{os.cpu_count()} cores  load average {os.getloadavg()[0]:.2f}")
    print(f"wrk -t1 -c{args.connections} --latency on loopback: {duration} interleaved "
          f"round(s) of 1 s per row, warm-up {warmup} s per row; median of rounds; "
          f"granian {args.granian_threads} blocking thread(s) per worker\n")
    results = measure_servers(duration, args.connections, warmup, args.granian_threads)
    for result in results:
        print(format_row(result))
    print()
    for line in ratio_lines(results):
        print(line)
    print("\nframework cost per request, in-process (best of 5, minus the raw WSGI call):")
    for line in framework_costs(timing_s):
        print(line)
    if args.profile:
        for case in CASES[1:3]:
            print(f"\ncProfile, row {case.key} ({case.label} {case.path}), top 15 by tottime:")
            print(profile(case, 2000 if args.quick else 20000))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (well above 1.0 means other "
          "work shared the 2 cores: compare ratios, not absolute figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
