"""Metric functions against closed forms and hand-built batches."""
from __future__ import annotations

import math

import pytest
import torch

from core import metrics
from core.types import RolloutBatch, TokenScores

MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
VALUES = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])


def test_masked_mean_and_sum():
    assert float(metrics.masked_sum(VALUES, MASK)) == 7.0
    assert math.isclose(float(metrics.masked_mean(VALUES, MASK)), 7 / 3, rel_tol=1e-6)
    assert torch.equal(metrics.masked_sum(VALUES, MASK, dim=1), torch.tensor([3.0, 4.0]))
    assert torch.equal(metrics.masked_mean(VALUES, MASK, dim=1), torch.tensor([1.5, 4.0]))
    assert float(metrics.masked_mean(VALUES, torch.zeros_like(MASK))) == 0.0


@pytest.mark.parametrize("vocab", [2, 17, 1000])
def test_entropy_of_uniform_is_log_vocab(vocab):
    entropy = metrics.entropy_from_logits(torch.full((2, 3, vocab), 4.2), chunk_size=4)
    assert entropy.shape == (2, 3)
    assert torch.allclose(entropy, torch.full((2, 3), math.log(vocab)), atol=1e-5)


def test_entropy_closed_forms_and_chunking():
    # Two-point distribution p = (0.2, 0.8) padded with -inf-like logits: H = -0.2 ln 0.2 - 0.8 ln 0.8.
    logits = torch.log(torch.tensor([[0.2, 0.8, 1e-30]]))
    expected = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert math.isclose(float(metrics.entropy_from_logits(logits)[0]), expected, rel_tol=1e-5)
    peaked = torch.tensor([[0.0, 1000.0, 0.0]])
    assert float(metrics.entropy_from_logits(peaked)[0]) < 1e-6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g).to(torch.bfloat16)
    whole = metrics.entropy_from_logits(logits, chunk_size=10_000)
    assert whole.dtype == torch.float32
    for size in (1, 4, 15):
        assert torch.allclose(metrics.entropy_from_logits(logits, chunk_size=size), whole, atol=1e-6)
    p = torch.softmax(logits.float(), -1)
    assert torch.allclose(whole, -(p * p.log()).sum(-1), atol=1e-5)


def test_kl_metrics_keys_and_values():
    scores = TokenScores(
        logprobs=torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]),
        ref_logprobs=torch.tensor([[-2.0, -1.0, -9.0], [-0.5, -9.0, -9.0]]),
        entropy=torch.tensor([[0.3, 0.6, 50.0], [0.9, 50.0, 50.0]]),
        exact_kl_reverse=torch.tensor([[0.1, 0.2, 50.0], [0.3, 50.0, 50.0]]),
        exact_kl_forward=torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]]),
    )
    out = metrics.kl_metrics(scores, MASK)
    for key in ("kl/k1_mean", "kl/k2_mean", "kl/k3_mean", "kl/exact_reverse", "kl/exact_forward",
                "entropy/token_mean"):
        assert key in out and isinstance(out[key], float)
    assert math.isclose(out["kl/k1_mean"], (1 - 1 + 0) / 3, abs_tol=1e-7)
    assert math.isclose(out["kl/k2_mean"], (0.5 + 0.5 + 0) / 3, rel_tol=1e-6)
    k3 = (math.exp(-1) - 1 + 1) + (math.exp(1) - 1 - 1)  # x = 1: r = e^-1; x = -1: r = e
    assert math.isclose(out["kl/k3_mean"], k3 / 3, rel_tol=1e-6)
    assert math.isclose(out["kl/exact_reverse"], 0.6 / 3, rel_tol=1e-6)
    assert math.isclose(out["kl/exact_forward"], 2.0, rel_tol=1e-6)
    assert math.isclose(out["kl/exact_forward_seq_mean"], (3.0 + 3.0) / 2, rel_tol=1e-6)
    assert math.isclose(out["entropy/token_mean"], 0.6, rel_tol=1e-6)


def _rollout_batch() -> RolloutBatch:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return RolloutBatch(
        prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_mask=torch.ones(4, 2, dtype=torch.bool),
        response_ids=torch.ones(4, 4, dtype=torch.long), response_mask=mask,
        sampler_logprobs=torch.tensor([[-1.0, -1.0, -1.0, 0.0], [-2.0, -2.0, -2.0, -2.0],
                                       [-1.0, 0.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]),
        group_index=torch.tensor([0, 0, 1, 1]), finish_reasons=["stop", "length", "stop", "stop"],
        prompt_texts=["p0", "p0", "p1", "p1"], response_texts=["a", "b", "c", "d"],
    )


def test_rollout_metrics():
    out = metrics.rollout_metrics(_rollout_batch(), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert out["reward/mean"] == 0.75
    assert math.isclose(out["reward/std"], math.sqrt(0.1875))  # population std
    assert out["response/length_mean"] == (3 + 4 + 1 + 2) / 4
    assert out["response/length_max"] == 4.0
    assert out["response/clip_ratio"] == 0.25
    assert all(isinstance(v, float) for v in out.values())


def test_offpolicy_metrics_gap_over_response_tokens_only():
    batch = _rollout_batch()
    learner = batch.sampler_logprobs.clone()
    learner[1, :] += 0.5  # 4 tokens off by 0.5
    learner[2, 3] = -99.0  # padding: ignored
    scores = TokenScores(logprobs=learner, ref_logprobs=learner, entropy=learner, exact_kl_reverse=learner,
                         exact_kl_forward=learner)
    out = metrics.offpolicy_metrics(batch, scores)
    assert math.isclose(out["rollout/logprob_gap"], 0.5 * 4 / 10, rel_tol=1e-6)
    assert math.isclose(out["rollout/logprob_gap_max"], 0.5)
