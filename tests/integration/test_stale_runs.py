"""A dead driver's open MLflow runs are marked stale (real MLflow sqlite store; no Ray)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

from orchestrator import stale
from orchestrator.tracking import STALE_TAG, make_tracker


def test_a_dead_drivers_open_runs_are_marked_and_a_reopen_clears_the_mark(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = make_tracker(uri)
    exp = tracker.ensure_experiment("s")
    parent = tracker.start_run(exp, "s", {"klrl.role": "study"})
    running = tracker.start_run(exp, "none s0", {"klrl.role": "trial"}, parent_id=parent)
    done = tracker.start_run(exp, "k1 s0", {"klrl.role": "trial"}, parent_id=parent)
    tracker.end_run(done, "FINISHED")
    other = tracker.start_run(exp, "another study's run", {})  # not this driver's: left alone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "driver.json").write_text(json.dumps({
        "experiment_id": exp, "parent_run_id": parent, "tracking_uri": uri,
        "driver": {"pid": dead.pid, "host": socket.gethostname(), "start_ticks": 1, "started_at": "t0"}}))

    marked = stale.mark_stale(tmp_path)
    assert len(marked) == 2 and any("none s0" in m for m in marked), marked
    for run_id in (parent, running):
        assert tracker.status(run_id) == "KILLED"
        tags = tracker.run_tags(run_id)
        assert tags[STALE_TAG] == "true" and f"pid {dead.pid}" in tags["klrl.stale_reason"]
    assert tracker.status(done) == "FINISHED" and STALE_TAG not in tracker.run_tags(done)
    assert tracker.status(other) == "RUNNING" and STALE_TAG not in tracker.run_tags(other)
    lines = stale.describe_stale(tmp_path, uri)
    assert len(lines) == 2 and all(line.startswith("stale run ") for line in lines), lines
    assert "## Stale runs" in stale.report_section(tracker.client, [exp])

    stale.record_driver(tmp_path)  # a --resume: this process drives the run dir now, and reopens the trial
    tracker.reopen(running)
    assert tracker.status(running) == "RUNNING" and STALE_TAG not in tracker.run_tags(running)
    assert stale.mark_stale(tmp_path) == []  # its driver lives
