"""Engines reused across trials are indistinguishable from fresh ones (real DeepSpeed, vLLM and Ray).

- A learner reset returns it exactly to its freshly built state under every ZeRO stage: the first update
  after a reset equals the first update after construction bit for bit (an Adam moment or a step
  counter left over would change it), and the new trial's lr is applied.
- Isolation: a trial's whole metric history (rollouts, rewards, KL, losses, pi_ref's evaluation, ...)
  is bitwise the same on engines reused from a trial of another arm and seed as on fresh engines.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.config import Config, TinyModelConfig

pytestmark = pytest.mark.timeout(600)



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(TinyModelConfig(num_layers=2, seed=5), tmp_path_factory.mktemp("tiny") / "policy")


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_learner_reset_is_exactly_a_fresh_learner(model_dir, zero_stage):
    from test_learner import synthetic_batch, train_batch

    from workers.learner import LearnerWorker

    config = Config().replace(**{"learner.lr": 1e-3, "learner.micro_batch_size": 4, "rollout.n_samples": 2,
                                 "task.prompts_per_step": 4, "learner.zero_stage": zero_stage})
    learner = LearnerWorker(model_dir, config)
    learner.snapshot(model_dir.parent / f"fresh-{zero_stage}")
    batch = synthetic_batch(learner.engine.module.config.vocab_size, seed=1)

    def update() -> tuple[dict, dict]:
        metrics = learner.update(train_batch(batch, learner.score(batch), seed=1))
        return dict(learner.export_weights()), metrics

    first = update()
    update()  # moments and counters move on
    learner.reset(config)
    engine = learner.engine
    assert (learner.steps, engine.global_steps, engine.global_samples, engine.micro_steps) == (0, 0, 0, 0)
    again = update()
    assert first[1] == again[1] and first[1]["learner/optimizer_steps"] == 1
    assert all(torch.equal(first[0][k], again[0][k]) for k in first[0])
    learner.reset(config.replace(**{"learner.lr": 3e-3, "run.seed": 7}))
    assert update()[1]["learner/lr"] == 3e-3 and torch.initial_seed() == 7
    with pytest.raises(ValueError, match=r"\['learner.micro_batch_size'\] are built into this learner"):
        learner.reset(config.replace(**{"learner.micro_batch_size": 2}))


def small_config(run_dir: Path, **dotted) -> Config:
    """The default study's policy and task at a few rows per step: a trial of 3 steps in seconds."""
    base = {"run.run_dir": str(run_dir), "rollout.n_samples": 4, "task.prompts_per_step": 4,
            "rollout.max_new_tokens": 10, "rollout.max_model_len": 128, "learner.micro_batch_size": 16,
            "run.steps": 3, "run.eval_every": 3, "run.eval_n_samples": 4,
            "run.diversity_every": 0, "run.samples_every": 0}
    return Config().replace(**{**base, **dotted})


def metric_history(engines, config: Config) -> dict[tuple[str, int], float]:
    """Every (metric, step) -> value of a trial run on `engines` (timings left out: they are wall time)."""
    from orchestrator.checkpoint import Ledger
    from orchestrator.tracking import NullTracker
    from orchestrator.trainable import prepare_evaluation, prepared_task
    from orchestrator.trial import Trial, run_steps
    from workers import environment
    from workers.engines import model_folder

    task, prompts, eval_prompts = prepared_task(model_folder(config, environment.run_dir()), config.task)
    trial = Trial(config, task, prompts, eval_prompts, engines.rollout, engines.learner)
    tracker = NullTracker()
    ledger = Ledger(tracker, tracker.start_run("0", "trial", {}))
    prepare_evaluation(trial, ledger)  # pi_ref sampled on these engines: each run has its own run dir
    run_steps(trial, 1, ledger, None, lambda step, metrics: None, {})
    return {(key, step): value for key, points in tracker.runs[ledger.run_id]["metrics"].items()
            for step, value in points if not key.startswith(("time/", "perf/tokens_per_s"))}


def test_a_trial_on_reused_engines_matches_one_on_fresh_engines(ray_session, tiny_policy, tmp_path):
    from workers.engines import EnginePool, create_placement_group

    other = small_config(tmp_path / "a", **{"algorithm.kl_mode": "in_loss", "algorithm.kl_estimator": "k3",
                                           "algorithm.kl_clamp": 10.0})
    # Another arm, seed, lr and temperature: everything a reset must apply, not keep.
    trial = small_config(tmp_path / "b", **{"algorithm.kl_mode": "in_reward", "run.seed": 1, "learner.lr": 3e-4,
                                           "rollout.temperature": 0.9})
    model = tiny_policy
    pg = create_placement_group(other)
    pool = EnginePool()
    try:
        engines, reused = pool.acquire(model, other, pg)
        assert not reused
        metric_history(engines, other)
        engines, reused = pool.acquire(model, trial, pg)
        assert reused
        on_reused = metric_history(engines, trial)
        pool.discard()
        engines, reused = pool.acquire(model, trial.replace(**{"run.run_dir": str(tmp_path / "c")}), pg)
        assert not reused
        on_fresh = metric_history(engines, trial.replace(**{"run.run_dir": str(tmp_path / "c")}))
    finally:
        pool.discard()
        ray_session.util.remove_placement_group(pg)
    assert {step for _, step in on_fresh} == {0, 1, 2, 3} and ("eval/pass_at_4", 3) in on_fresh
    assert on_fresh[("kl/exact_reverse", 3)] > 0 and on_fresh[("learner/grad_norm", 1)] > 0  # it did learn
    assert on_reused.keys() == on_fresh.keys()
    same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))  # noqa: E731
    differing = {k: (on_reused[k], v) for k, v in on_fresh.items() if not same(on_reused[k], v)}
    assert not differing, differing
