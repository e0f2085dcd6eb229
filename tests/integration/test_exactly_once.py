"""Exactly-once metrics through Ray Tune, with faults injected (real Ray, Tune, vLLM, DeepSpeed, MLflow).

One small study, two trials, one after the other on 2 CPUs:
- `none`: its rollout actor is SIGKILLed (pid from Ray's actor table) right after its step-2 checkpoint is
  complete; Tune retries it, it resumes from its newest complete checkpoint on fresh engines, and its
  MLflow history holds each (metric, step) exactly once, every step present, one `time/startup_s` per
  start.
- `blowup`: an lr of 1e30 sends its policy's weights to ~1e30 and its step-2 log-probs to NaN; it fails
  at that step naming the metric, FAILED with `klrl.failure` in MLflow, and Tune does not retry it. It runs
  on the engines the first trial's retry left (reused across arms).
This module starts and stops its own Ray (through `launch.run_study`), so it takes no `ray_session`.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)

STEPS = 8


def fault_study(folder: Path):
    """The default study's tiny policy (it learns: non-zero advantages) at a few rows per step."""
    from orchestrator.search_space import load_study

    base = {"model": {"path": "tiny"}, "rollout": {"n_samples": 4, "max_new_tokens": 10, "max_model_len": 128},
            "learner": {"micro_batch_size": 16}, "task": {"prompts_per_step": 4},
            "run": {"steps": STEPS, "checkpoint_every": 2, "eval_every": 4, "eval_n_samples": 2, "samples_every": 4,
                    "diversity_every": 0}}
    arms = [{"name": "none", "algorithm.kl_mode": "none"},
            {"name": "blowup", "algorithm.kl_mode": "none", "learner.lr": 1.0e30}]  # NaN at step 2
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump({"name": "faults", "base": base, "grid": {"arms": arms},
                                    "tune": {"max_failures": 1}}))
    return load_study(path)


def kill_rollout_after_checkpoint(storage: Path, stop: threading.Event, killed: list) -> None:
    """Wait for the first trial's complete step-2 checkpoint, then SIGKILL its rollout actor."""
    import ray
    from ray._private import state

    while not stop.is_set():
        if list(storage.glob("faults/trial_*/checkpoints/step_000002/state.json")):
            actors = state.actors(actor_state_name="ALIVE").values() if ray.is_initialized() else []
            pids = [a["Pid"] for a in actors if a["ActorClassName"] == "RolloutWorker"]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)
            return
        time.sleep(0.05)


def num_failures(storage: Path) -> dict[str, int]:
    """Tune's failure count per trial id, from its experiment state."""
    newest = max((storage / "faults").glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    out = {}
    for trial_json, metadata_json in json.loads(newest.read_text())["trial_data"]:
        out[json.loads(trial_json)["trial_id"]] = json.loads(metadata_json)["num_failures"]
    return out


@pytest.fixture(scope="module")
def study_run(run_dir, tiny_policy):
    from mlflow import MlflowClient

    from orchestrator import launch

    folder = Path(run_dir) / "e2e" / f"faults-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    study = launch.prepare_run_dir(fault_study(folder), folder, resume=False)
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=kill_rollout_after_checkpoint, args=(folder / "tune", stop, killed))
    watcher.start()
    try:
        outcome = launch.run_study(study, folder, log=lambda *a: None)
    finally:
        stop.set()
        watcher.join()
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = {r.data.tags["klrl.trial_name"].split("_")[0]: r for r in client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id]) if r.data.tags.get("klrl.role") == "trial"}
    histories = {arm: {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
                       for key in run.data.metrics} for arm, run in runs.items()}
    return dict(outcome=outcome, runs=runs, histories=histories, killed=killed,
                failures=num_failures(folder / "tune"))


def test_a_killed_rollout_actor_costs_a_retry_and_no_metric_is_doubled_or_lost(study_run):
    assert study_run["killed"], "the fault was never injected"
    run, history = study_run["runs"]["none"], study_run["histories"]["none"]
    assert run.info.status == "FINISHED" and study_run["failures"][run.data.tags["klrl.trial_id"]] == 1
    doubled = {key: steps for key, steps in history.items() if len(steps) != len(set(steps))}
    assert not doubled, doubled
    steps = list(range(1, STEPS + 1))
    assert sorted(history["reward/mean"]) == steps and sorted(history["klrl/logged_step"]) == [0, *steps]
    assert sorted(history["eval/pass_at_1"]) == [0, 4, 8]
    starts = sorted(history["time/startup_s"])
    assert len(starts) == 2 and starts[0] == 1 and starts[1] in (3, 5, 7), starts  # after a checkpoint


def test_a_non_finite_trial_fails_once_naming_metric_and_step(study_run):
    run = study_run["runs"]["blowup"]
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["klrl.failure"] and "step " in run.data.tags["klrl.failure"]
    assert study_run["failures"][run.data.tags["klrl.trial_id"]] == 1  # not retried into the same NaN
    outcome = study_run["outcome"]
    assert (outcome.finished, outcome.failed, outcome.total) == (1, 1, 2)
