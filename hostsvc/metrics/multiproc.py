"""The multiprocess metrics directory: setup, worker exits, and archiving dead processes.

prometheus_client's multiprocess mode gives every process its own mmap files
(`counter_<pid>.db`, `histogram_<pid>.db`, `gauge_livesum_<pid>.db`) and a scrape reads
them all. Dead processes' counter and histogram files must stay (their totals are part
of every counter), so under worker churn the directory, and with it scrape time, would
grow without bound. Here the files of a dead process are merged into one
`counter_archive.db` / `histogram_archive.db` (the client reads the type from the file
name and ignores the rest), under an exclusive flock on `archive.lock` that scrapes
take shared, so a scrape never sees a file both merged and still present.

A merge is replace-then-unlink, two steps: a journal written between the merge and
those steps lets whoever takes the lock next finish them, so an arbiter killed mid-merge
(the supervisor KILLs hung pools) neither loses nor double-counts a total. No fsync:
the directory is wiped at every supervisor start, so only process crashes matter.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .spec import mp_metrics

ENV = "PROMETHEUS_MULTIPROC_DIR"
LOCK_NAME = "archive.lock"
JOURNAL_NAME = "archive.journal"
ARCHIVED_TYPES = ("counter", "histogram")
# Files this module and prometheus_client create; a per-process one carries its pid.
PID_FILE_RE = re.compile(r"^(?:(?:counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db|"
                         r"exit_(\d+))$")
OWN_FILE_RE = re.compile(r"^(?:.*\.db|.*\.db\.next|exit_\d+|archive\.(?:lock|journal)"
                         r"(?:\.tmp)?)$")
EXIT_ATTR = "_hostsvc_exit_cause"


def prepare_multiproc_dir(path: str) -> None:
    """Create `path` (removing metrics files of a previous run) and point children at it.

    Call before any pool starts, so every child inherits PROMETHEUS_MULTIPROC_DIR, and
    before anything in this process imports prometheus_client (checked: a library
    imported earlier would keep its values in memory, invisible to the scrape).
    Only files this module or prometheus_client create are removed, so a wrong path
    cannot wipe unrelated data.
    """
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before prepare_multiproc_dir(); "
                           "its metrics would not be shared between processes")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if OWN_FILE_RE.match(name):
            os.unlink(os.path.join(path, name))
    os.environ[ENV] = os.path.abspath(path)


def multiproc_dir(path: str | None = None) -> str:
    """`path`, or the directory from the environment (prepare_multiproc_dir sets it)."""
    found = path or os.environ.get(ENV)
    if not found:
        raise RuntimeError(f"{ENV} is not set: call prepare_multiproc_dir() first")
    return found


@contextmanager
def locked(path: str, exclusive: bool) -> Iterator[None]:
    """Hold `archive.lock` in `path`: exclusive to merge files, shared to read them."""
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)   # releases the lock


def archive_process(pid: int, path: str | None = None) -> None:
    """Retire one exited process: drop its live gauges, merge its counters/histograms."""
    archive_processes([pid], multiproc_dir(path))


def archive_processes(pids: list[int], path: str) -> None:
    """Retire exited processes `pids` (see the module docstring)."""
    from prometheus_client.multiprocess import mark_process_dead

    for pid in pids:
        mark_process_dead(pid, path)
    with locked(path, exclusive=True):
        _merge(path, pids)


def archive_dead_processes(path: str | None = None) -> list[int]:
    """Find processes whose files remain but that no longer exist, and retire them.

    gunicorn's child_exit retires workers as they exit; this catches what no hook saw:
    arbiters themselves, and the workers of an arbiter that was killed. MetricsServer
    runs it before every scrape. Returns the pids it retired.
    """
    path = multiproc_dir(path)
    pids = set()
    for name in os.listdir(path):
        m = PID_FILE_RE.match(name)
        if m:
            pids.add(int(m.group(1) or m.group(2)))
    dead = sorted(p for p in pids if p != os.getpid() and not os.path.exists(f"/proc/{p}"))
    if dead:
        archive_processes(dead, path)
        for pid in dead:
            _take_exit_cause(path, pid)
    return dead


def _merge(path: str, pids: list[int]) -> None:
    """Sum the pids' counter/histogram files into the archives. Hold the lock."""
    from prometheus_client.mmap_dict import MmapedDict

    _apply_journal(path)
    replace: list[tuple[str, str]] = []
    remove: list[str] = []
    for typ in ARCHIVED_TYPES:
        dead = [f for f in (os.path.join(path, f"{typ}_{pid}.db") for pid in pids)
                if os.path.exists(f)]
        if not dead:
            continue
        archive = os.path.join(path, f"{typ}_archive.db")
        totals: dict[str, float] = defaultdict(float)
        for f in ([archive] if os.path.exists(archive) else []) + dead:
            # Keys are identical JSON for the same series in every file; histogram
            # buckets are stored per bucket (not cumulative), so plain sums are right.
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(f):
                totals[key] += value
        nxt = archive + ".next"
        if os.path.exists(nxt):
            os.unlink(nxt)
        out = MmapedDict(nxt)
        try:
            for key, value in totals.items():
                out.write_value(key, value, 0.0)
        finally:
            out.close()
        replace.append((os.path.basename(nxt), os.path.basename(archive)))
        remove.extend(os.path.basename(f) for f in dead)
    if not replace:
        return
    journal = os.path.join(path, JOURNAL_NAME)
    with open(journal + ".tmp", "w") as fh:
        json.dump({"replace": replace, "remove": remove}, fh)
    os.replace(journal + ".tmp", journal)
    _apply_journal(path)


def _apply_journal(path: str) -> None:
    """Finish a merge whose journal was written: move archives in place, drop sources."""
    journal = os.path.join(path, JOURNAL_NAME)
    try:
        with open(journal) as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return
    for src, dst in doc["replace"]:
        if os.path.exists(os.path.join(path, src)):
            os.replace(os.path.join(path, src), os.path.join(path, dst))
    for name in doc["remove"]:
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    os.unlink(journal)


def _take_exit_cause(path: str, pid: int) -> str | None:
    """Read and remove the cause a worker wrote as it exited (None: it wrote none)."""
    marker = os.path.join(path, f"exit_{pid}")
    try:
        with open(marker) as fh:
            cause = fh.read().strip()
        os.unlink(marker)
        return cause
    except FileNotFoundError:
        return None


def worker_exited(app_name: str, pid: int, cause: str) -> None:
    """In a pool's main process, after it reaped worker `pid`: count the restart by its
    cause (crash, timeout, max_requests, lifetime; "shutdown" is a stop asked for, not a
    restart) and retire the worker's files. Every engine reports its exits here."""
    if cause != "shutdown":
        mp_metrics()["hostsvc_worker_restarts_total"].labels(app_name, cause).inc()
    archive_process(pid)


def gunicorn_hooks(app_name: str) -> dict[str, Callable[..., Any]]:
    """Server hooks for one app's arbiter: restart counting and dead-worker cleanup.

    The cause of an exit is known in two processes: the arbiter knows it aborted a
    worker for a timeout (`worker.aborted`); only the worker knows it reached
    max_requests (`nr` lives in the worker) or was told to stop. So `worker_exit`
    (in the worker) leaves a one-word marker file and `child_exit` (in the arbiter,
    after reaping) reads it: no marker means the worker died without running Python's
    cleanup (SIGKILL, OOM, segfault), a crash. Stops asked for by the arbiter (TERM on
    shutdown or scale-down) are not restarts and are not counted.
    """
    def worker_abort(worker: Any) -> None:
        setattr(worker, EXIT_ATTR, "timeout")

    def worker_exit(server: Any, worker: Any) -> None:
        cause = getattr(worker, EXIT_ATTR, None)
        if cause is None:
            if worker.nr >= worker.max_requests:
                cause = "max_requests"
            else:
                cause = "crash" if worker.alive else "shutdown"
        with open(os.path.join(multiproc_dir(), f"exit_{os.getpid()}"), "w") as fh:
            fh.write(cause)

    def child_exit(server: Any, worker: Any) -> None:
        cause = _take_exit_cause(multiproc_dir(), worker.pid) or "crash"
        worker_exited(app_name, worker.pid, "timeout" if worker.aborted else cause)

    return {"worker_abort": worker_abort, "worker_exit": worker_exit,
            "child_exit": child_exit}
