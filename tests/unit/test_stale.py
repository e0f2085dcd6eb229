"""Is a run dir's recorded driver alive? (orchestrator/stale.py): pid, host and start time, no MLflow."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from orchestrator import stale


def test_this_process_is_alive_and_a_driver_on_another_host_cannot_be_judged():
    me = stale.this_driver()
    assert me.pid == os.getpid() and me.host == socket.gethostname() and me.start_ticks is not None
    assert stale.is_alive(me) is True
    assert stale.is_alive(stale.Driver(me.pid, "elsewhere.example", me.start_ticks)) is None


def test_a_dead_pid_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert stale.is_alive(stale.Driver(child.pid, socket.gethostname(), None)) is False


def test_a_recycled_pid_is_not_the_driver():
    """The pid is alive but started at another time than the recorded driver: the driver is dead."""
    me = stale.this_driver()
    assert stale.is_alive(stale.Driver(me.pid, me.host, me.start_ticks - 1)) is False


def test_record_driver_keeps_the_mlflow_ids_and_reads_back(tmp_path):
    (tmp_path / "driver.json").write_text(json.dumps({"experiment_id": "7", "parent_run_id": "abc"}))
    stale.record_driver(tmp_path, ray_address="127.0.0.1:1234")
    state = stale.read_state(tmp_path)
    assert state["experiment_id"] == "7" and state["parent_run_id"] == "abc"
    assert state["ray_address"] == "127.0.0.1:1234"
    assert stale.recorded_driver(state) == stale.this_driver()
    assert [p.name for p in tmp_path.iterdir()] == ["driver.json"]  # no temp file left


def test_nothing_is_marked_without_a_recorded_driver_or_while_it_lives(tmp_path):
    assert stale.mark_stale(tmp_path, "sqlite:///nowhere.db") == []  # no driver.json
    stale.record_driver(tmp_path)
    assert stale.mark_stale(tmp_path, "sqlite:///nowhere.db") == []  # this process: alive
