"""Processes named by pid and start time (orchestrator/processes.py), and what a dead driver left running
stopped by that name (orchestrator/stale.stop_leftovers). Real processes, no Ray."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from orchestrator import processes, stale


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield proc
    proc.kill()
    proc.wait()


def gone(proc: subprocess.Popen, timeout_s: float = 10) -> bool:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_a_process_is_named_by_pid_and_start_time(sleeper):
    me = processes.identity(sleeper.pid)
    assert me is not None and processes.is_running(me)
    assert not processes.is_running((sleeper.pid, me[1] + 1))  # same pid, another start: a recycled pid
    assert me in processes.descendants(os.getpid())
    assert "time.sleep(300)" in processes.describe(sleeper.pid)


def test_kill_spares_a_recycled_pid_and_kills_the_named_process(sleeper):
    ticks = processes.start_ticks(sleeper.pid)
    assert processes.kill([(sleeper.pid, ticks - 1)]) == []
    assert not gone(sleeper, 0.5)
    [line] = processes.kill([(sleeper.pid, ticks)])
    assert line.startswith(f"pid {sleeper.pid} (") and gone(sleeper)
    assert processes.kill([(sleeper.pid, ticks)]) == []  # gone (a zombie until waited for): nothing to do


def test_a_dead_drivers_recorded_processes_are_stopped_and_a_live_ones_are_not(tmp_path, sleeper):
    left = processes.identity(sleeper.pid)
    stale.record_driver(tmp_path, own_processes=[left])
    assert stale.read_state(tmp_path)["driver"]["processes"] == [list(left)]
    assert stale.stop_leftovers(tmp_path) == []  # this process, the driver, lives
    assert not gone(sleeper, 0.5)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = stale.read_state(tmp_path)
    state["driver"].update(pid=dead.pid, start_ticks=None)
    (tmp_path / stale.DRIVER_FILE).write_text(json.dumps(state))
    state["driver"]["host"] = "elsewhere.example"
    other_host = tmp_path / "other"
    other_host.mkdir()
    (other_host / stale.DRIVER_FILE).write_text(json.dumps(state))
    assert stale.stop_leftovers(other_host) == []  # a driver on another host: its pids are not ours
    assert not gone(sleeper, 0.5)
    assert socket.gethostname() != "elsewhere.example"

    [line] = stale.stop_leftovers(tmp_path)
    assert f"pid {sleeper.pid} " in line and gone(sleeper)
    assert stale.stop_leftovers(tmp_path) == []
