"""The full-stack benchmark (issues #3 and #4): what does hosting through hostsvc cost?

One command runs, in one process and interleaved so machine noise falls on every row:

  A  bare gunicorn (sync, 2 workers) serving a raw WSGI hello over TCP: the baseline
  B  `hostsvc run`: nginx -> the app's pool (sync, 2 workers, unix socket) -> hostsvc.web
     hello tree, with request metrics on
  C  the same with request metrics off (the metrics server still runs)

and prints requests/s, p50/p99, B/A (target >= 0.75) and the metrics cost 1 - B/C
(target < 5%). Then it starts hostsvc with 10 apps and times `hostsvc run` until all of
them answer through nginx (target < 3 s), and prints the RSS (and PSS, which does not
count pages shared between forked workers twice) of the supervisor and of one idle pool.

    .venv/bin/python bench/fullstack.py [--duration 8] [--connections 32] [--quick]

Only ratios within one run mean anything: absolute req/s move with machine load.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median
from typing import Iterator

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import apps  # noqa: E402
from web import (Case, free_port, parse_wrk, run_wrk, serving, stop_group,  # noqa: E402
                 wait_ready)

TARGET_STACK_OVER_BARE = 0.75
TARGET_METRICS_COST = 0.05
TARGET_STARTUP_S = 3.0
STARTUP_APPS = 10


def write_config(directory: Path, port: int, n_apps: int, metrics: bool) -> Path:
    """A hostsvc config serving bench/apps.py's hello tree `n_apps` times (/app0/, ...)."""
    lines = [f"listen: 127.0.0.1:{port}", f"runtime_dir: {directory / 'run'}",
             "access_log: off            # bare gunicorn writes no access log either",
             f"python_path: [{BENCH_DIR}]",
             "metrics:",
             f"  listen: 127.0.0.1:{free_port()}",
             f"  requests: {'true' if metrics else 'false'}",
             "apps:"]
    for i in range(n_apps):
        lines += [f"  - name: app{i}", f"    root: apps:HostsvcRoot", "    workers: 2"]
    path = directory / "hostsvc.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def hostsvc(n_apps: int, metrics: bool = True) -> Iterator[tuple[int, Path, float]]:
    """Run `hostsvc run` on a fresh config; yield (port, runtime dir, seconds until every
    app answered through nginx). Stops it with SIGTERM (SIGKILL if it lingers)."""
    with tempfile.TemporaryDirectory(prefix="hostsvc-bench-") as tmp:
        port = free_port()
        config = write_config(Path(tmp), port, n_apps, metrics)
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "hostsvc", "run", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            for i in range(n_apps):
                wait_ready(f"http://127.0.0.1:{port}/app{i}/", apps.HELLO, proc, timeout=60)
            ready = time.monotonic() - t0
            yield port, Path(tmp) / "run", ready
        finally:
            stop_group(proc, timeout=40)


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc."""
    rss = pss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def measure_load(duration: int, connections: int, warmup: int) -> dict[str, tuple]:
    """Rows A, B, C loaded in interleaved 1 s rounds (see bench/web.py for why)."""
    probe = Case("a", "raw WSGI hello", "raw", "/", apps.HELLO)
    samples: dict[str, list[tuple[float, float, float, int]]] = {"A": [], "B": [], "C": []}
    with serving("gunicorn", "raw", probe) as bare, hostsvc(1, True) as (on, _, _), \
            hostsvc(1, False) as (off, _, _):
        urls = {"A": f"http://127.0.0.1:{bare}/", "B": f"http://127.0.0.1:{on}/app0/",
                "C": f"http://127.0.0.1:{off}/app0/"}
        for url in urls.values():
            run_wrk(url, warmup, connections)
        order = list(urls)
        for round_no in range(duration):
            shift = round_no % len(order)
            for key in order[shift:] + order[:shift]:
                samples[key].append(parse_wrk(run_wrk(urls[key], 1, connections)))
    return {k: (median(s[0] for s in v), median(s[1] for s in v), median(s[2] for s in v),
                sum(s[3] for s in v)) for k, v in samples.items()}


LABELS = {"A": "bare gunicorn sync x2, raw WSGI hello",
          "B": "hostsvc run: nginx -> pool -> web hello, metrics on",
          "C": "hostsvc run: nginx -> pool -> web hello, metrics off"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="rounds of 1 s per row")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 rounds, short warm-up (smoke)")
    args = parser.parse_args(argv)
    duration, warmup = (2, 1) if args.quick else (args.duration, 1)

    print(f"hostsvc full-stack benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  "
          f"{os.cpu_count()} cores  load average {os.getloadavg()[0]:.2f}")
    print(f"wrk -t1 -c{args.connections}: {duration} interleaved round(s) of 1 s per row, "
          "median of rounds\n")
    rows = measure_load(duration, args.connections, warmup)
    for key, (rps, p50, p99, errors) in rows.items():
        print(f"{key}  {LABELS[key]:<54} {rps:>10.1f} req/s  p50 {p50:>7.2f} ms  "
              f"p99 {p99:>8.2f} ms  errors {errors}")
    stack = rows["B"][0] / rows["A"][0] if rows["A"][0] else 0.0
    cost = 1 - rows["B"][0] / rows["C"][0] if rows["C"][0] else 0.0
    print()
    print(f"ratio B/A  full stack / bare gunicorn         {stack:6.2f}x  target >= "
          f"{TARGET_STACK_OVER_BARE:.2f}  {'PASS' if stack >= TARGET_STACK_OVER_BARE else 'MISS'}")
    print(f"metrics cost 1 - B/C                          {cost * 100:6.1f} %  target <  "
          f"{TARGET_METRICS_COST * 100:.0f} %  {'PASS' if cost < TARGET_METRICS_COST else 'MISS'}")

    with hostsvc(STARTUP_APPS) as (_, runtime, ready):
        state = json.loads((runtime / "state.json").read_text())
        sup = memory_kib(state["supervisor_pid"])
        pool = state["apps"]["app0"]
        pool_pids = [pool["pid"], *pool["worker_pids"]]
        pool_mem = [memory_kib(pid) for pid in pool_pids]
        nginx_pid = state["nginx"]["pid"]
        nginx = memory_kib(nginx_pid) if nginx_pid else (0, 0)
    print(f"startup    hostsvc run -> {STARTUP_APPS} apps answering via nginx  {ready:6.2f} s"
          f"      target <  {TARGET_STARTUP_S:.0f} s   {'PASS' if ready < TARGET_STARTUP_S else 'MISS'}")
    print(f"memory     supervisor                       RSS {sup[0] / 1024:7.1f} MiB  "
          f"PSS {sup[1] / 1024:7.1f} MiB")
    print(f"memory     one idle pool (arbiter + {len(pool_pids) - 1} workers)  "
          f"RSS {sum(m[0] for m in pool_mem) / 1024:7.1f} MiB  "
          f"PSS {sum(m[1] for m in pool_mem) / 1024:7.1f} MiB")
    print(f"memory     nginx master                     RSS {nginx[0] / 1024:7.1f} MiB  "
          f"PSS {nginx[1] / 1024:7.1f} MiB")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
