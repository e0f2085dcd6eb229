"""Processes of this host, each named by pid *and* start time, so a recycled pid is never taken for another.

klrl stops what a dead driver left behind (orchestrator/reaper.py, orchestrator/stale.py) only by such an
identity: never by a name pattern, and never with `ray stop`, which stops every Ray on the machine. The
kill goes through a pidfd opened *before* the start time is checked, so the signal reaches the process that
was checked even if the pid is recycled in between. Linux /proc only: elsewhere nothing is found.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

Identity = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the (comm): [0] state (field 3), [1] ppid (4), [19] start time (22)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot; None if it is gone or /proc is missing."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def identity(pid: int) -> Identity | None:
    ticks = start_ticks(pid)
    return None if ticks is None else (pid, ticks)


def is_running(process: Identity) -> bool:
    """The process lives (a zombie has exited: only its parent's wait is missing) and is the one named."""
    fields = _stat(process[0])
    return fields is not None and fields[0] != "Z" and int(fields[19]) == process[1]


def descendants(pid: int) -> list[Identity]:
    """Every live process below `pid`, children before grandchildren."""
    children: dict[int, list[Identity]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child[0])
    return found


def describe(pid: int) -> str:
    """`pid` and what it runs (the program's name, not its folder, which a deep checkout makes long)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        argv = ["?"]
    command = " ".join([Path(argv[0]).name, *argv[1:]]).strip()
    return f"pid {pid} ({' '.join(command.split())[:160]})"


def kill(targets: list[Identity]) -> list[str]:
    """SIGKILL each named process that still runs; one line per process killed."""
    killed = []
    for pid, ticks in targets:
        try:
            handle = os.pidfd_open(pid)
        except OSError:  # gone already
            continue
        try:
            if not is_running((pid, ticks)):
                continue
            line = describe(pid)
            signal.pidfd_send_signal(handle, signal.SIGKILL)
            killed.append(line)
        except ProcessLookupError:
            continue
        finally:
            os.close(handle)
    return killed
