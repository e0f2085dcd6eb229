"""A study whose driver is interrupted (SIGINT), resumed, killed (SIGKILL) and resumed again, as a user would.

After SIGINT no trial run is left RUNNING. After each death, `--resume` restarts every unfinished trial
from the newest complete checkpoint it wrote, whatever Tune's own (older) experiment state says: the
first step a restarted trial logs is the one right after that checkpoint. In the end every trial's
MLflow history holds each (metric, step) once, every step present, and one `time/startup_s` per start.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from e2e_helpers import KLRL, ROOT, SMOKE, klrl, trial_runs
from workers import environment

STEPS = 6


def start_driver(run_dir: Path, *args: str) -> subprocess.Popen:
    log = open(run_dir / f"driver-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([KLRL, "run", SMOKE, "--run-dir", str(run_dir), *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)


def complete_checkpoints(run_dir: Path) -> dict[str, int]:
    """Newest complete checkpoint step per trial folder (a readable state.json marks a complete one)."""
    newest = {}
    for state in (run_dir / "tune" / "smoke").glob("trial_*/checkpoints/step_*/state.json"):
        try:
            step = json.loads(state.read_text())["step"]
        except (ValueError, KeyError):
            continue
        trial = state.parents[2].name
        newest[trial] = max(newest.get(trial, 0), step)
    return newest


def wait_for(predicate, driver: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert driver.poll() is None, f"driver exited with {driver.returncode} before the fault"
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.2)


def processes_under(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (this study's own Ray temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def wait_until_gone(marker: str, timeout_s: float = 60) -> None:
    """The killed driver's Ray dies with it (kernel fate-sharing); stragglers are killed by pid."""
    deadline = time.monotonic() + timeout_s
    while processes_under(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_under(marker):
        os.kill(pid, signal.SIGKILL)


def test_sigint_then_sigkill_then_resume_restart_from_the_newest_checkpoint(short_run_dir):
    settings = ("--set", f"run.steps={STEPS}", "--set", "run.checkpoint_every=2")
    driver = start_driver(short_run_dir, *settings)
    try:
        wait_for(lambda: complete_checkpoints(short_run_dir), driver)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) != 0
    finally:
        driver.kill()
    statuses = [r.info.status for r in trial_runs(short_run_dir)]
    assert statuses and "RUNNING" not in statuses, statuses

    before = complete_checkpoints(short_run_dir)
    driver = start_driver(short_run_dir, "--resume")
    try:  # killed right after a checkpoint newer than any the interrupted driver left
        wait_for(lambda: any(complete_checkpoints(short_run_dir).get(t, 0) > s for t, s in before.items())
                 or len(complete_checkpoints(short_run_dir)) > len(before), driver)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    wait_until_gone(str(environment.ray_temp_dir(short_run_dir)))
    newest = complete_checkpoints(short_run_dir)  # nothing writes any more: what --resume must start from

    done = klrl("run", SMOKE, "--run-dir", str(short_run_dir), "--resume")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Error handling checkpoint" not in done.stdout + done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{short_run_dir / 'mlflow.db'}")
    runs = trial_runs(short_run_dir)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        history = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
                   for key in run.data.metrics}
        doubled = {key: steps for key, steps in history.items() if len(steps) != len(set(steps))}
        assert not doubled, (run.info.run_name, doubled)
        assert sorted(history["reward/mean"]) == list(range(1, STEPS + 1)), run.info.run_name
        trial = f"trial_{run.data.tags['klrl.trial_id']}"
        if trial in newest and newest[trial] < STEPS:  # unfinished when killed: its last start resumed here
            assert max(history["time/startup_s"]) == newest[trial] + 1, (trial, newest, history["time/startup_s"])


if os.environ.get("KLRL_SKIP_E2E"):  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="KLRL_SKIP_E2E is set")
