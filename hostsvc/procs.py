"""Linux process plumbing shared by the supervisor and the pool children.

Why a module of its own: both sides need the same facts from the kernel (who dies with
whom, who is whose child, what a process uses) and neither side should import the other
to get them.
"""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def set_parent_death_signal(sig: int = signal.SIGTERM, expected_ppid: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux only).

    If the parent already died before this call (the fork/exec race), exit at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if expected_ppid is not None and os.getppid() != expected_ppid:
        os._exit(1)


def children_of(ppid: int, zombies: bool = False) -> list[int]:
    """Live pids whose parent is `ppid` (or only its unreaped zombies), from /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may hold spaces and parens.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == ppid and (fields[0] == b"Z") == zombies:
            found.append(int(entry))
    return sorted(found)


def proc_usage(pid: int, with_children: bool) -> tuple[int, float] | None:
    """(RSS bytes, CPU seconds) of `pid` from /proc/PID/stat; None if it is gone.

    `with_children` adds the CPU of reaped children (cutime/cstime): for an arbiter that
    is its exited workers, which keeps the pool's CPU counter from dropping on restarts.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # After the command name (which may hold spaces and parens): field 3 onwards.
    fields = stat[stat.rfind(b")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])                   # utime, stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])              # cutime, cstime
    return int(fields[21]) * PAGE_SIZE, ticks / CLOCK_TICKS     # rss (pages)
