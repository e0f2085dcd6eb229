"""The trial loop with fake engines (no Ray, vLLM or DeepSpeed), the tracking adapter's null twin, and the
checkpoint ledger that makes metrics exactly-once.

The fakes implement the `Rollout` and `Learner` protocols of core/types.py (checked below, signatures
included) and record their calls, so these tests check the stage order, that in-reward KL reaches the
advantages and in-loss KL does not, 1-based steps, non-finite metrics, and that a trial killed anywhere
and restarted from its newest checkpoint leaves each (metric, step) in the tracker exactly once.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

from core.config import Config
from core.types import Learner, Rollout, RolloutBatch, TokenScores
from orchestrator import trial as trial_mod
from orchestrator.checkpoint import LOGGED_STEP, CheckpointStore, Ledger
from orchestrator.tracking import PARENT_TAG, NullTracker, make_tracker
from tasks.base import Example, Task

B_PROMPTS, N, T = 2, 4, 5


class FakeRollout:
    def __init__(self, calls):
        self.calls = calls

    def generate(self, prompts: list[str], n: int, seed: int) -> RolloutBatch:
        self.calls.append("rollout")
        b = len(prompts) * n
        mask = torch.ones(b, T, dtype=torch.bool)
        mask[:, -1] = False
        return RolloutBatch(prompt_ids=torch.ones(b, 2, dtype=torch.long),
                            prompt_mask=torch.ones(b, 2, dtype=torch.bool),
                            response_ids=torch.ones(b, T, dtype=torch.long), response_mask=mask,
                            sampler_logprobs=torch.full((b, T), -1.0),
                            group_index=torch.arange(len(prompts)).repeat_interleave(n),
                            finish_reasons=["stop"] * b, prompt_texts=[p for p in prompts for _ in range(n)],
                            response_texts=[("aba" if i % 2 else "abc") for i in range(b)])

    def reset(self, config: Config) -> None:
        self.calls.append("rollout reset")

    def shutdown(self) -> None:
        self.calls.append("rollout shutdown")


class FakeLearner:
    """Its 'weights' are the number of updates it made; checkpoints hold that number."""

    def __init__(self, calls, fail_at_update: int | None = None, loss: float = 0.1):
        self.calls, self.train_batches, self.updates = calls, [], 0
        self.fail_at_update, self.loss = fail_at_update, loss

    def score(self, batch: RolloutBatch) -> TokenScores:
        self.calls.append("reference")
        b = batch.batch_size
        return TokenScores(logprobs=torch.full((b, T), -1.0), ref_logprobs=torch.full((b, T), -1.5),
                           entropy=torch.ones(b, T), exact_kl_reverse=torch.full((b, T), 0.4),
                           exact_kl_forward=torch.full((b, T), 0.6))

    def update(self, batch) -> dict[str, float]:
        if self.updates + 1 == self.fail_at_update:
            raise RuntimeError("learner rank died")
        self.calls.append("update")
        self.train_batches.append(batch)
        self.updates += 1
        return {"loss/policy": self.loss, "learner/updates": float(self.updates)}

    def sync_weights_to(self, rollout: Rollout) -> None:
        self.calls.append("sync")

    def save_checkpoint(self, directory: str) -> None:
        from pathlib import Path

        Path(directory).mkdir(parents=True)
        (Path(directory) / "updates.json").write_text(json.dumps(self.updates))

    def load_checkpoint(self, directory: str) -> None:
        from pathlib import Path

        self.updates = json.loads((Path(directory) / "updates.json").read_text())

    def reset(self, config: Config) -> None:
        self.updates = 0

    def shutdown(self) -> None:
        self.calls.append("learner shutdown")


class FakeTask(Task):
    """A palindrome-like task; valid_answer/valid_answers/normalized_answer are Task's own (the real rule)."""

    default_instruction = ""

    def __init__(self):
        self.train = [Example(question=q, answer=q) for q in ("aab", "bba", "ccd", "dde")]
        self.eval = self.train[:1]

    def reward(self, response, example):
        return 1.0 if response == response[::-1] else 0.0

    def extract_answer(self, response):
        return response

    def normalize_answer(self, answer):
        return answer.strip().lower()


def make_trial(run: dict | None = None, learner: FakeLearner | None = None, **algo) -> tuple[trial_mod.Trial, list]:
    calls = []
    cfg = Config.from_dict({"rollout": {"n_samples": N}, "task": {"prompts_per_step": B_PROMPTS, "train_size": 4},
                            "algorithm": algo, "run": {"steps": 4, "diversity_every": 0, **(run or {})}})
    task = FakeTask()
    trial = trial_mod.Trial(config=cfg, task=task, prompts=[e.question for e in task.train], eval_prompts=["aab"],
                            rollout=FakeRollout(calls), learner=learner or FakeLearner(calls))
    trial.learner.calls = calls
    return trial, calls


def assert_implements(obj, protocol) -> None:
    """isinstance on the runtime-checkable protocol, plus the same parameter names for every method."""
    assert isinstance(obj, protocol)
    for name, member in vars(protocol).items():
        if callable(member) and not name.startswith("_"):
            expected = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(type(obj), name)).parameters) == expected, name


def test_fakes_implement_the_engine_protocols():
    trial, _ = make_trial()
    assert_implements(trial.rollout, Rollout)
    assert_implements(trial.learner, Learner)
    assert not isinstance(trial.rollout, Learner)  # the check can fail


def test_step_runs_the_stages_in_order_and_times_them():
    trial, calls = make_trial(kl_mode="none")
    metrics = trial_mod.rl_step(trial, step=1)
    assert calls == ["rollout", "reference", "update", "sync"]
    for stage in ("rollout", "reward", "reference", "advantage", "update", "sync", "metrics"):
        assert metrics[f"time/{stage}_s"] >= 0
    assert metrics["perf/response_tokens"] == B_PROMPTS * N * (T - 1)
    assert metrics["perf/tokens_per_s"] > 0
    assert metrics["reward/mean"] == 0.5 and "kl/k1_mean" in metrics and "loss/policy" in metrics


@pytest.mark.parametrize("mode, estimator, shifted", [("none", "k1", False), ("in_loss", "k3", False),
                                                      ("in_reward", "k1", True), ("in_reward", "exact_forward", True)])
def test_only_in_reward_kl_changes_the_advantages(mode, estimator, shifted):
    baseline, _ = make_trial(kl_mode="none")
    clamp = {"kl_clamp": 10.0} if estimator == "k3" else {}  # the config refuses unclamped k3
    trial, _ = make_trial(kl_mode=mode, kl_estimator=estimator, kl_coef=0.1, **clamp)
    trial_mod.rl_step(baseline, 1)
    trial_mod.rl_step(trial, 1)
    diff = trial.learner.train_batches[0].advantages - baseline.learner.train_batches[0].advantages
    assert bool(diff.abs().max() > 1e-6) is shifted
    if shifted:  # the penalty is a negative reward-to-go: it lowers the advantage of the first token most
        assert float(diff[0, 0]) < float(diff[0, T - 2]) < 0


def test_prompt_order_is_a_function_of_seed_and_step():
    a, _ = make_trial()
    b, _ = make_trial()
    assert [a.step_examples(s)[0] for s in range(1, 5)] == [b.step_examples(s)[0] for s in range(1, 5)]
    epoch = a.step_examples(1)[0] + a.step_examples(2)[0]
    assert sorted(epoch) == sorted(a.prompts)  # an epoch visits every prompt once


def test_due_counts_one_based_steps_and_always_the_last():
    assert [s for s in range(1, 11) if trial_mod.due(s, 4, 10)] == [4, 8, 10]
    assert not any(trial_mod.due(s, 0, 10) for s in range(1, 11))


def test_a_non_finite_metric_names_itself_and_its_step():
    trial_mod.check_finite({"loss/policy": 0.1, "diversity/embed_cos": float("nan")}, 3)  # not checked
    with pytest.raises(trial_mod.NonFiniteMetric, match=r"step 3: kl/k3_mean is inf"):
        trial_mod.check_finite({"loss/policy": 0.1, "kl/k3_mean": float("inf")}, 3)
    with pytest.raises(trial_mod.NonFiniteMetric, match="learner/grad_norm is nan"):
        trial_mod.check_finite({"learner/grad_norm": float("nan")}, 1)


def run(trial, tracker, run_id, store, first: int = 1, reports: list | None = None) -> None:
    reports = [] if reports is None else reports
    trial_mod.run_steps(trial, first, Ledger(tracker, run_id), store, lambda s, m: reports.append((s, m)),
                        {"time/startup_s": 0.5})


def history(tracker: NullTracker, run_id: str) -> dict[str, list[int]]:
    return {key: [step for step, _ in points] for key, points in tracker.runs[run_id]["metrics"].items()}


def test_metrics_reach_the_tracker_at_checkpoints_with_one_based_steps(tmp_path):
    tracker = NullTracker()
    run_id = tracker.start_run("0", "t", {})
    trial, _ = make_trial(run={"steps": 5, "checkpoint_every": 2, "samples_every": 5})
    store = CheckpointStore(str(tmp_path / "ckpt"), tmp_path / "staging")
    reports = []
    run(trial, tracker, run_id, store, reports=reports)
    assert [s for s, _ in reports] == [1, 2, 3, 4, 5]
    steps = history(tracker, run_id)
    assert steps["reward/mean"] == steps[LOGGED_STEP] == [1, 2, 3, 4, 5]
    assert steps["time/startup_s"] == [1]  # once per start, with its first step
    assert "samples/step_00005.json" in tracker.runs[run_id]["artifacts"]
    assert json.loads(tracker.runs[run_id]["artifacts"]["samples/step_00005.json"])[0]["step"] == 5
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000004", "step_000005"]  # 2 kept


def test_without_checkpoints_metrics_are_written_at_the_end():
    tracker = NullTracker()
    run_id = tracker.start_run("0", "t", {})
    trial, _ = make_trial(run={"steps": 3})
    seen = []
    trial_mod.run_steps(trial, 1, Ledger(tracker, run_id), None,
                        lambda s, m: seen.append(len(tracker.runs[run_id]["metrics"])), {})
    assert seen == [0, 0, len(tracker.runs[run_id]["metrics"])] and seen[-1] > 0


@pytest.mark.parametrize("crash_at", [1, 3, 4, 6])
def test_a_trial_killed_mid_way_logs_every_step_exactly_once(tmp_path, crash_at):
    """Crash at update `crash_at`, restart from the newest complete checkpoint (the learner state it
    restores is what the steps after it start from), finish: one value per (metric, step)."""
    tracker = NullTracker()
    run_id = tracker.start_run("0", "t", {})
    store = CheckpointStore(str(tmp_path / "ckpt"), tmp_path / "staging")
    cfg = {"steps": 6, "checkpoint_every": 2}
    first, _ = make_trial(run=cfg, learner=FakeLearner([], fail_at_update=crash_at))
    with pytest.raises(RuntimeError, match="learner rank died"):
        run(first, tracker, run_id, store)
    second, _ = make_trial(run=cfg)
    ledger = Ledger(tracker, run_id)
    last = ledger.restore(store, second.learner.load_checkpoint)
    assert last == 2 * ((crash_at - 1) // 2) and second.learner.updates == last
    trial_mod.run_steps(second, last + 1, ledger, store, lambda s, m: None, {"time/startup_s": 0.7})
    steps = history(tracker, run_id)
    assert all(v == [1, 2, 3, 4, 5, 6] for k, v in steps.items() if k != "time/startup_s"), steps
    assert steps["time/startup_s"] == ([1, last + 1] if last else [1])
    updates = dict(tracker.runs[run_id]["metrics"]["learner/updates"])
    assert updates == {s: float(s) for s in range(1, 7)}  # resumed state, not a fresh learner


def test_a_half_written_checkpoint_is_skipped_and_flushed_steps_are_not_rewritten(tmp_path, caplog):
    tracker = NullTracker()
    run_id = tracker.start_run("0", "t", {})
    store = CheckpointStore(str(tmp_path / "ckpt"), tmp_path / "staging")
    trial, _ = make_trial(run={"steps": 4, "checkpoint_every": 2})
    run(trial, tracker, run_id, store)
    (tmp_path / "ckpt" / "step_000006" / "learner").mkdir(parents=True)  # died while saving step 6
    (tmp_path / "ckpt" / "step_000004" / "state.json").write_text('{"step": 4, "pend')  # and 4 torn
    newest = store.newest()
    assert newest.step == 2 and "step_000006" in caplog.text and "step_000004" in caplog.text
    before = history(tracker, run_id)
    Ledger(tracker, run_id).restore(store, trial.learner.load_checkpoint)  # step 2's pending: logged already
    assert history(tracker, run_id) == before


def test_null_tracker_records_runs_params_metrics_and_children():
    tracker = make_tracker("null://")
    assert isinstance(tracker, NullTracker)
    exp = tracker.ensure_experiment("study")
    parent = tracker.start_run(exp, "study", {"klrl.role": "study"})
    child = tracker.start_run(exp, "trial", {"klrl.trial_id": "t1"}, parent_id=parent)
    tracker.log_params(child, {"algorithm.kl_mode": "none", "run.seed": 0})
    tracker.log_metrics(child, {"reward/mean": 0.5, "eval/pass@1": 0.2, "note": "x"}, step=1)
    tracker.log_metrics(child, {"reward/mean": 0.7}, step=2)
    tracker.log_table(child, [{"prompt": "p", "response": "r", "reward": 1.0}], "samples/step_00001.json")
    run = tracker.runs[child]
    assert run["tags"][PARENT_TAG] == parent and run["params"]["run.seed"] == "0"
    assert run["metrics"]["reward/mean"] == [(1, 0.5), (2, 0.7)] and tracker.latest_metric(child, "reward/mean") == 0.7
    assert "eval/pass_at_1" in run["metrics"] and "note" not in run["metrics"]
    assert tracker.find_run(exp, {"klrl.trial_id": "t1"}) == child
    assert tracker.end_open_children(exp, parent, "KILLED") == 1
    assert tracker.status(child) == "KILLED" and tracker.status(parent) == "RUNNING"


def test_orchestrator_modules_import_without_mlflow_or_ray():
    code = ("import sys, orchestrator.tracking, orchestrator.search_space, orchestrator.config_io; "
            "bad = [m for m in ('mlflow', 'ray', 'vllm', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
