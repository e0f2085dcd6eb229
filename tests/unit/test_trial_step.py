"""The trial's RL step with fake actors (no Ray, vLLM or DeepSpeed), and the tracking adapter's null twin.

The fakes record the calls, so these tests check the stage order, that in-reward KL reaches the
advantages and in-loss KL does not, the timing/throughput keys, and the trial-run bookkeeping.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from core.config import Config
from core.types import RolloutBatch, TokenScores
from orchestrator import trial as trial_mod
from orchestrator.tracking import PARENT_TAG, NullTracker, make_tracker

B_PROMPTS, N, T = 2, 4, 5


class FakeRollout:
    def __init__(self, calls):
        self.calls = calls

    def generate(self, prompts, n, seed):
        self.calls.append("rollout")
        b = len(prompts) * n
        mask = torch.ones(b, T, dtype=torch.bool)
        mask[:, -1] = False
        return RolloutBatch(prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.bool),
                            response_ids=torch.ones(b, T, dtype=torch.long), response_mask=mask,
                            sampler_logprobs=torch.full((b, T), -1.0),
                            group_index=torch.arange(len(prompts)).repeat_interleave(n),
                            finish_reasons=["stop"] * b, prompt_texts=[p for p in prompts for _ in range(n)],
                            response_texts=[("aba" if i % 2 else "abc") for i in range(b)])

    def update_weights(self, weights):
        self.calls.append("sync")


class FakeLearner:
    def __init__(self, calls):
        self.calls, self.train_batches = calls, []

    def score(self, batch):
        self.calls.append("reference")
        b = batch.batch_size
        return TokenScores(logprobs=torch.full((b, T), -1.0), ref_logprobs=torch.full((b, T), -1.5),
                           entropy=torch.ones(b, T), exact_kl_reverse=torch.full((b, T), 0.4),
                           exact_kl_forward=torch.full((b, T), 0.6))

    def update(self, train_batch):
        self.calls.append("update")
        self.train_batches.append(train_batch)
        return {"loss/policy": 0.1}

    def sync_weights_to(self, rollout):
        rollout.update_weights("weights")


class FakeTask:
    def __init__(self):
        from tasks.base import Example

        self.train = [Example(question=q, answer=q) for q in ("aab", "bba", "ccd", "dde")]
        self.eval = self.train[:1]

    def reward(self, response, example):
        return 1.0 if response == response[::-1] else 0.0

    def extract_answer(self, response):
        return response


def make_trial(**algo) -> tuple[trial_mod.Trial, list]:
    calls = []
    cfg = Config.from_dict({"rollout": {"n_samples": N}, "task": {"prompts_per_step": B_PROMPTS, "train_size": 4},
                            "algorithm": algo, "run": {"steps": 4, "diversity_every": 0}})
    task = FakeTask()
    trial = trial_mod.Trial(config=cfg, task=task, prompts=[e.question for e in task.train], eval_prompts=["aab"],
                            rollout=FakeRollout(calls), learner=FakeLearner(calls))
    return trial, calls


def test_step_runs_the_stages_in_order_and_times_them():
    trial, calls = make_trial(kl_mode="none")
    metrics = trial_mod.rl_step(trial, step=0)
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
    trial, _ = make_trial(kl_mode=mode, kl_estimator=estimator, kl_coef=0.1)
    trial_mod.rl_step(baseline, 0)
    trial_mod.rl_step(trial, 0)
    diff = trial.learner.train_batches[0].advantages - baseline.learner.train_batches[0].advantages
    assert bool(diff.abs().max() > 1e-6) is shifted
    if shifted:  # the penalty is a negative reward-to-go: it lowers the advantage of the first token most
        assert float(diff[0, 0]) < float(diff[0, T - 2]) < 0


def test_prompt_order_is_a_function_of_seed_and_step():
    a, _ = make_trial()
    b, _ = make_trial()
    assert [a.step_examples(s)[0] for s in range(4)] == [b.step_examples(s)[0] for s in range(4)]
    epoch0 = a.step_examples(0)[0] + a.step_examples(1)[0]
    assert sorted(epoch0) == sorted(a.prompts)  # an epoch visits every prompt once


def test_due_counts_one_based_steps_and_always_the_last():
    assert [s for s in range(10) if trial_mod._due(s, 4, 10)] == [3, 7, 9]
    assert not any(trial_mod._due(s, 0, 10) for s in range(10))


def test_null_tracker_records_runs_params_metrics_and_children():
    tracker = make_tracker("null://")
    assert isinstance(tracker, NullTracker)
    exp = tracker.ensure_experiment("study")
    parent = tracker.start_run(exp, "study", {"klrl.role": "study"})
    child = tracker.start_run(exp, "trial", {"klrl.trial_id": "t1"}, parent_id=parent)
    tracker.log_params(child, {"algorithm.kl_mode": "none", "run.seed": 0})
    tracker.log_metrics(child, {"reward/mean": 0.5, "eval/pass@1": 0.2, "note": "x"}, step=0)
    tracker.log_metrics(child, {"reward/mean": 0.7}, step=1)
    tracker.log_table(child, [{"prompt": "p", "response": "r", "reward": 1.0}], "samples/step_00001.json")
    run = tracker.runs[child]
    assert run["tags"][PARENT_TAG] == parent and run["params"]["run.seed"] == "0"
    assert run["metrics"]["reward/mean"] == [(0, 0.5), (1, 0.7)]
    assert "eval/pass_at_1" in run["metrics"] and "note" not in run["metrics"]
    assert tracker.find_run(exp, {"klrl.trial_id": "t1"}) == child
    assert tracker.end_open_children(exp, parent, "KILLED") == 1
    assert tracker.status(child) == "KILLED" and tracker.status(parent) == "RUNNING"


def test_orchestrator_modules_import_without_mlflow_or_ray():
    code = ("import sys, orchestrator.tracking, orchestrator.search_space, orchestrator.config_io; "
            "bad = [m for m in ('mlflow', 'ray', 'vllm', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
