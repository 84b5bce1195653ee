"""The full-stack benchmark (issues #3, #4, #7): what does hosting through hostsvc cost,
and what does the granian engine buy?

One command runs, in one process and interleaved so machine noise falls on every row:

  A  bare gunicorn (sync, 2 workers) serving a raw WSGI hello over TCP: the baseline
  B  `hostsvc run`: nginx -> the app's pool (gunicorn sync, 2 workers, unix socket) ->
     hostsvc.web hello tree, with request metrics on
  C  the same with request metrics off (the metrics server still runs)
  D  bare granian (2 workers, 1 blocking thread each) serving the raw WSGI hello
  E  as B with `engine: granian` (2 workers, 1 thread; nginx keeps upstream connections)
  F  as E with request metrics off

and prints requests/s, p50/p99, B/A (target >= 0.75), the metrics cost 1 - B/C
(target < 5%), E/B, the full stack on granian over the full stack on gunicorn (target
>= 2.5), and E/D and 1 - E/F for the same questions on granian. Then it starts hostsvc
with 10 apps and times `hostsvc run` until all of them answer through nginx (target
< 3 s), and prints the RSS (and PSS, which does not count pages shared between forked
workers twice) of the supervisor and of one idle pool.

Rows B, C, E and F each run on METRICS_INSTANCES stacks of their own, their rounds
pooled: two identical stacks can differ by several percent for the whole run (hash
seeds, memory layout), which is as large as the metrics cost being measured. For the
same reason CPU time per request (utime + stime from /proc and getrusage) is printed
beside the throughput, of the pool and of the whole stack (pool, nginx and wrk): it moves
less with the load of the rest of the machine and with scheduling, and with every core
busy, 1 - CPU off / CPU on is what the metrics cost in throughput.

    .venv/bin/python bench/fullstack.py [--duration 8] [--connections 32] [--quick]

Only ratios within one run mean anything: absolute req/s move with machine load.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
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
from hostsvc.procs import children_of, proc_usage  # noqa: E402
from web import (Case, free_port, parse_wrk, run_wrk, serving, stop_group,  # noqa: E402
                 wait_ready)

TARGET_STACK_OVER_BARE = 0.75
TARGET_METRICS_COST = 0.05
TARGET_STARTUP_S = 3.0
STARTUP_APPS = 10
METRICS_INSTANCES = 2


def write_config(directory: Path, port: int, n_apps: int, metrics: bool,
                 engine: str = "gunicorn") -> Path:
    """A hostsvc config serving bench/apps.py's hello tree `n_apps` times (/app0/, ...)."""
    lines = [f"listen: 127.0.0.1:{port}", f"runtime_dir: {directory / 'run'}",
             "access_log: off            # bare gunicorn writes no access log either",
             f"python_path: [{BENCH_DIR}]",
             "metrics:",
             f"  listen: 127.0.0.1:{free_port()}",
             f"  requests: {'true' if metrics else 'false'}",
             "apps:"]
    for i in range(n_apps):
        lines += [f"  - name: app{i}", f"    root: apps:HostsvcRoot", "    workers: 2",
                  f"    engine: {engine}"]
    path = directory / "hostsvc.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def hostsvc(n_apps: int, metrics: bool = True, engine: str = "gunicorn"
            ) -> Iterator[tuple[int, Path, float]]:
    """Run `hostsvc run` on a fresh config; yield (port, runtime dir, seconds until every
    app answered through nginx). Stops it with SIGTERM (SIGKILL if it lingers)."""
    with tempfile.TemporaryDirectory(prefix="hostsvc-bench-") as tmp:
        port = free_port()
        config = write_config(Path(tmp), port, n_apps, metrics, engine)
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


def read_state(runtime: Path, timeout: float = 10) -> dict:
    """state.json once the supervisor has written it with the workers of every app (it
    writes on its next tick after the apps are ready, so right after start it may lag)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = json.loads((runtime / "state.json").read_text())
            if all(a["worker_pids"] for a in state["apps"].values()):
                return state
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no state.json with live workers in {runtime}")
        time.sleep(0.2)


def pool_memory(app_state: dict) -> tuple[int, int, int]:
    """(workers, RSS KiB, PSS KiB) of one pool: its main process and its workers."""
    mem = [memory_kib(pid) for pid in [app_state["pid"], *app_state["worker_pids"]]]
    return len(mem) - 1, sum(m[0] for m in mem), sum(m[1] for m in mem)


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds the processes used so far, with the children they reaped."""
    return sum((proc_usage(pid, with_children=True) or (0, 0.0))[1] for pid in pids)


def stack_pids(runtime: Path) -> tuple[list[int], list[int]]:
    """(app0's pool: main process and workers, nginx: master and workers) of a run."""
    state = read_state(runtime)
    app, nginx = state["apps"]["app0"], state["nginx"]["pid"]
    return [app["pid"], *app["worker_pids"]], [nginx, *children_of(nginx)]


def wrk_round(url: str, connections: int, runtime: Path | None) -> Sample:
    """One 1 s wrk round; for a hostsvc run also the CPU seconds of its pool, of its
    nginx and of wrk itself (this process's reaped children: wrk is the only one)."""
    pids = stack_pids(runtime) if runtime else ([], [])
    before = [cpu_seconds(p) for p in pids]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    rps, p50, p99, errors = parse_wrk(run_wrk(url, 1, connections))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    pool, nginx = (cpu_seconds(p) - b for p, b in zip(pids, before))
    wrk = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return rps, p50, p99, errors, pool, nginx, wrk


# req/s, p50, p99, errors, CPU seconds of the round: pool, nginx, wrk
Sample = tuple[float, float, float, int, float, float, float]
# per row: median req/s, p50, p99, errors; hostsvc rows: CPU us per request of the pool
# and of the whole stack (pool + nginx + wrk)
Row = tuple[float, float, float, int, "float | None", "float | None"]


def measure_load(duration: int, connections: int, warmup: int) -> dict[str, Row]:
    """Rows A-F loaded in interleaved 1 s rounds (see bench/web.py for why); B, C, E
    and F on METRICS_INSTANCES stacks each."""
    probe = Case("a", "raw WSGI hello", "raw", "/", apps.HELLO)
    targets: list[tuple[str, str, Path | None]] = []     # (row, url, runtime dir)
    with contextlib.ExitStack() as stack:
        for key, server in (("A", "gunicorn"), ("D", "granian")):
            port = stack.enter_context(serving(server, "raw", probe, 1))
            targets.append((key, f"http://127.0.0.1:{port}/", None))
        for key, engine, metrics in (("B", "gunicorn", True), ("C", "gunicorn", False),
                                     ("E", "granian", True), ("F", "granian", False)):
            for _ in range(METRICS_INSTANCES):
                port, runtime, _ = stack.enter_context(hostsvc(1, metrics, engine))
                targets.append((key, f"http://127.0.0.1:{port}/app0/", runtime))
        for _, url, _ in targets:
            run_wrk(url, warmup, connections)
        samples: dict[str, list[Sample]] = {k: [] for k in LABELS}
        for round_no in range(duration):
            shift = round_no % len(targets)
            for key, url, runtime in targets[shift:] + targets[:shift]:
                samples[key].append(wrk_round(url, connections, runtime))
    rows = {}
    for key, v in samples.items():
        served = sum(s[0] for s in v)          # rounds of 1 s: req/s = requests
        pool = whole = None
        if key not in "AD" and served:
            pool = sum(s[4] for s in v) / served * 1e6
            whole = sum(s[4] + s[5] + s[6] for s in v) / served * 1e6
        rows[key] = (median(s[0] for s in v), median(s[1] for s in v),
                     median(s[2] for s in v), sum(s[3] for s in v), pool, whole)
    return rows


LABELS = {"A": "bare gunicorn sync x2, raw WSGI hello",
          "B": "hostsvc: nginx -> gunicorn pool -> web hello, metrics on",
          "C": "hostsvc: nginx -> gunicorn pool -> web hello, metrics off",
          "D": "bare granian x2, raw WSGI hello",
          "E": "hostsvc: nginx -> granian pool -> web hello, metrics on",
          "F": "hostsvc: nginx -> granian pool -> web hello, metrics off"}
TARGET_GRANIAN_OVER_GUNICORN = 2.5


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
          f"median of rounds; rows B, C, E, F on {METRICS_INSTANCES} stacks each\n")
    rows = measure_load(duration, args.connections, warmup)
    for key, (rps, p50, p99, errors, _, _) in rows.items():
        print(f"{key}  {LABELS[key]:<54} {rps:>10.1f} req/s  p50 {p50:>7.2f} ms  "
              f"p99 {p99:>8.2f} ms  errors {errors}")
    def ratio(num: str, den: str) -> float:
        return rows[num][0] / rows[den][0] if rows[den][0] else 0.0

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    stack, cost = ratio("B", "A"), 1 - ratio("B", "C")
    engines = ratio("E", "B")
    print()
    print(f"ratio B/A  full stack / bare gunicorn         {stack:6.2f}x  target >= "
          f"{TARGET_STACK_OVER_BARE:.2f}  {verdict(stack >= TARGET_STACK_OVER_BARE)}")
    print(f"metrics cost 1 - B/C  (gunicorn)              {cost * 100:6.1f} %  target <  "
          f"{TARGET_METRICS_COST * 100:.0f} %  {verdict(cost < TARGET_METRICS_COST)}")
    print(f"ratio E/B  full stack granian / gunicorn      {engines:6.2f}x  target >= "
          f"{TARGET_GRANIAN_OVER_GUNICORN:.2f}  {verdict(engines >= TARGET_GRANIAN_OVER_GUNICORN)}")
    print(f"ratio E/D  full stack / bare granian          {ratio('E', 'D'):6.2f}x")
    print(f"metrics cost 1 - E/F  (granian)               {(1 - ratio('E', 'F')) * 100:6.1f} %")
    for on, off, engine in (("B", "C", "gunicorn"), ("E", "F", "granian")):
        cpu_on, cpu_off = rows[on][4], rows[off][4]
        print(f"pool CPU per request, {engine:<8} metrics on {cpu_on:6.1f} us  off "
              f"{cpu_off:6.1f} us  metrics {cpu_on - cpu_off:+5.1f} us")
        cpu_on, cpu_off = rows[on][5], rows[off][5]
        # With every core busy, throughput is cores / CPU per request.
        print(f"stack CPU per request, {engine:<8} (pool+nginx+wrk) on {cpu_on:6.1f} us  off "
              f"{cpu_off:6.1f} us  metrics cost by CPU {(1 - cpu_off / cpu_on) * 100:5.1f} %")

    with hostsvc(STARTUP_APPS) as (_, runtime, ready):
        state = read_state(runtime)
        sup = memory_kib(state["supervisor_pid"])
        pools = {"gunicorn": pool_memory(state["apps"]["app0"])}
        nginx_pid = state["nginx"]["pid"]
        nginx = memory_kib(nginx_pid) if nginx_pid else (0, 0)
    with hostsvc(1, engine="granian") as (_, runtime, _):
        pools["granian"] = pool_memory(read_state(runtime)["apps"]["app0"])
    print(f"startup    hostsvc run -> {STARTUP_APPS} apps answering via nginx  {ready:6.2f} s"
          f"      target <  {TARGET_STARTUP_S:.0f} s   {verdict(ready < TARGET_STARTUP_S)}")
    print(f"memory     supervisor                       RSS {sup[0] / 1024:7.1f} MiB  "
          f"PSS {sup[1] / 1024:7.1f} MiB")
    for engine, (workers, rss, pss) in pools.items():
        print(f"memory     idle {engine} pool (main + {workers} workers) "
              f"RSS {rss / 1024:7.1f} MiB  PSS {pss / 1024:7.1f} MiB")
    print(f"memory     nginx master                     RSS {nginx[0] / 1024:7.1f} MiB  "
          f"PSS {nginx[1] / 1024:7.1f} MiB")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
