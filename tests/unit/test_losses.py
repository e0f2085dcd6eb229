"""PPO clip at its boundaries, aggregation modes by hand, and the in-loss KL term of policy_loss."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from core import kl, losses
from core.config import AlgorithmConfig

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (1 + 2 + 4) / 3),
    ("seq-mean-token-sum", (3 + 4 + 0) / 3),  # the empty third row counts (as verl and the learner's units)
    ("seq-mean-token-mean", (1.5 + 4 + 0) / 3),
])
def test_aggregation_modes_hand_computed(mode, expected):
    assert math.isclose(float(losses.aggregate(VALUES, MASK, mode)), expected, rel_tol=1e-6)
    assert float(losses.aggregate(VALUES, torch.zeros_like(MASK), mode)) == 0.0  # empty batch: 0, not nan


def test_unknown_aggregation_lists_valid_modes():
    with pytest.raises(ValueError, match=r"'mean'.*token-mean.*seq-mean-token-sum"):
        losses.aggregate(VALUES, MASK, "mean")


def _grad_at(ratio: float, advantage: float, **clip) -> tuple[float, float]:
    """(loss, d loss / d log pi) for one token with the given ratio pi/pi_old and advantage."""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = losses.ppo_clip_token_loss(logp, torch.zeros(1, 1), torch.tensor([[advantage]]), **clip)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return float(loss.detach()), float(grad)


@pytest.mark.parametrize("ratio,advantage,zero_grad", [
    (1.1, 1.0, False), (1.3, 1.0, True),    # A > 0: clipped above 1 + eps only
    (0.7, 1.0, False),                      # A > 0 and ratio below 1 - eps: still pushed up
    (0.9, -1.0, False), (0.7, -1.0, True),  # A < 0: clipped below 1 - eps only
    (1.5, -1.0, False),                     # A < 0 and ratio above 1 + eps: still pushed down
])
def test_ppo_clip_gradient_is_zero_only_outside_in_the_advantage_direction(ratio, advantage, zero_grad):
    loss, grad = _grad_at(ratio, advantage, clip_eps=0.2)
    if zero_grad:
        assert grad == 0.0
        assert math.isclose(loss, -advantage * (1.2 if advantage > 0 else 0.8), rel_tol=1e-6)
    else:
        assert math.isclose(grad, -advantage * ratio, rel_tol=1e-5)  # d(-A ratio)/d log pi = -A ratio
        assert math.isclose(loss, -advantage * ratio, rel_tol=1e-6)


def test_clip_higher_is_asymmetric():
    assert _grad_at(1.25, 1.0, clip_eps=0.2)[1] == 0.0
    assert _grad_at(1.25, 1.0, clip_eps=0.2, clip_eps_high=0.28)[1] != 0.0
    assert _grad_at(0.75, -1.0, clip_eps=0.2, clip_eps_high=0.28)[1] == 0.0  # low side keeps clip_eps


def test_dual_clip_caps_negative_advantage_losses():
    loss, grad = _grad_at(5.0, -2.0, clip_eps=0.2, dual_clip=3.0)
    assert math.isclose(loss, 6.0, rel_tol=1e-6) and grad == 0.0  # -A * c, no gradient
    loss, grad = _grad_at(2.0, -2.0, clip_eps=0.2, dual_clip=3.0)
    assert math.isclose(loss, 4.0, rel_tol=1e-6) and math.isclose(grad, 4.0, rel_tol=1e-5)  # below c: PPO
    loss, grad = _grad_at(5.0, 2.0, clip_eps=0.2, dual_clip=3.0)  # A > 0 untouched: clipped at 1 + eps
    assert math.isclose(loss, -2.4, rel_tol=1e-6) and grad == 0.0
    assert _grad_at(5.0, -2.0, clip_eps=0.2)[1] != 0.0  # without dual clip it keeps pushing


def _batch(seed=0, b=4, t=5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g) * 2).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(b, t, generator=g)
    ref = -torch.rand(b, t, generator=g) * 2
    advantages = torch.randn(b, t, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return logp, old, ref, advantages, mask


def test_policy_loss_on_policy_value_and_metrics():
    logp, _, ref, advantages, mask = _batch()
    algo = AlgorithmConfig(kl_mode="none")
    loss, metrics = losses.policy_loss(logp, logp.detach(), ref, advantages, mask, algo)
    assert math.isclose(float(loss.detach()), -float(advantages[mask].mean()), rel_tol=1e-5)  # ratio = 1
    assert metrics["ppo/clip_frac"] == 0.0 and metrics["loss/kl"] == 0.0
    assert math.isclose(metrics["ppo/ratio_mean"], 1.0) and abs(metrics["ppo/approx_kl"]) < 1e-7
    assert set(metrics) >= {"loss/policy", "loss/kl", "loss/total", "ppo/clip_frac", "ppo/approx_kl"}
    assert all(isinstance(v, float) for v in metrics.values())


def test_clip_frac_counts_tokens_with_an_active_clip():
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]])  # clipped, not clipped, clipped, not clipped
    _, metrics = losses.policy_loss(logp, torch.zeros(1, 4), torch.zeros(1, 4), advantages,
                                    torch.ones(1, 4, dtype=torch.bool), AlgorithmConfig())
    assert metrics["ppo/clip_frac"] == 0.5


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3_plus"])
def test_in_loss_kl_adds_beta_times_aggregated_estimator(estimator):
    logp, old, ref, advantages, mask = _batch()
    base = AlgorithmConfig(kl_mode="none", loss_agg="seq-mean-token-mean")
    algo = dataclasses.replace(base, kl_mode="in_loss", kl_estimator=estimator, kl_coef=0.3)
    loss_none, _ = losses.policy_loss(logp, old, ref, advantages, mask, base)
    loss_kl, metrics = losses.policy_loss(logp, old, ref, advantages, mask, algo)
    kl_term = losses.aggregate(kl.sampled_kl(logp, ref, estimator), mask.float(), "seq-mean-token-mean")
    assert math.isclose(metrics["loss/kl"], float(kl_term.detach()), rel_tol=1e-5)
    grad_diff = torch.autograd.grad(loss_kl, logp, retain_graph=True)[0] - torch.autograd.grad(loss_none, logp)[0]
    assert torch.allclose(grad_diff, 0.3 * torch.autograd.grad(kl_term, logp)[0], atol=1e-6)
    # kl_mode=in_reward puts nothing in the loss.
    _, in_reward = losses.policy_loss(logp, old, ref, advantages, mask, dataclasses.replace(
        algo, kl_mode="in_reward", kl_estimator="k1"))
    assert in_reward["loss/kl"] == 0.0


def test_importance_correction_weights_kl_by_the_ratio_in_the_graph():
    logp, old, ref, advantages, mask = _batch()
    algo = AlgorithmConfig(kl_mode="in_loss", kl_estimator="k3", kl_importance_correction=True)
    term = losses.in_loss_kl(logp, old, ref, algo)
    ratio = (logp - old).exp()
    k3 = kl.sampled_kl(logp, ref, "k3")
    assert torch.allclose(term, ratio.detach() * k3.detach())
    (grad,) = torch.autograd.grad(term.sum(), logp)
    (expected,) = torch.autograd.grad((ratio * k3).sum(), logp)
    assert torch.allclose(grad, expected, atol=1e-6)
    # On-policy the value is unchanged (w = 1) ...
    plain = dataclasses.replace(algo, kl_importance_correction=False)
    on_policy = losses.in_loss_kl(logp, logp.detach(), ref, algo)
    assert torch.allclose(on_policy, losses.in_loss_kl(logp, old, ref, plain))


def test_importance_corrected_k3_loss_has_the_reverse_kl_gradient_on_policy():
    """E_{a~pi}[grad (pi/sg(pi)) k3(a)] = grad KL(pi || pi_ref), exactly (enumerated vocabulary).

    Without the correction the same loss gives grad KL(pi_ref || pi) (the forward-KL gradient), so the
    corrected variant is the control for the seed study's "forward-KL style" arm.
    """
    g = torch.Generator().manual_seed(11)
    theta = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    prob = logp.exp().detach()

    def expected_loss_grad(correct: bool) -> torch.Tensor:
        algo = AlgorithmConfig(kl_mode="in_loss", kl_estimator="k3", kl_importance_correction=correct)
        term = losses.in_loss_kl(logp[None], logp.detach()[None], ref_logp[None], algo)[0]
        return torch.autograd.grad((prob * term).sum(), theta, retain_graph=True)[0]

    reverse = (logp.exp() * (logp - ref_logp)).sum()
    forward = (ref_logp.exp() * (ref_logp - logp)).sum()
    (grad_reverse,) = torch.autograd.grad(reverse, theta, retain_graph=True)
    (grad_forward,) = torch.autograd.grad(forward, theta, retain_graph=True)
    assert torch.allclose(expected_loss_grad(True), grad_reverse, atol=1e-10)
    assert torch.allclose(expected_loss_grad(False), grad_forward, atol=1e-10)
    assert not torch.allclose(grad_reverse, grad_forward, atol=1e-3)


def test_exact_kl_in_loss_uses_the_right_direction_and_requires_it():
    logp, old, ref, advantages, mask = _batch()
    reverse = torch.rand(4, 5, requires_grad=True)
    forward = torch.rand(4, 5, requires_grad=True) + 5
    for estimator, chosen in (("exact_reverse", reverse), ("exact_forward", forward)):
        algo = AlgorithmConfig(kl_mode="in_loss", kl_estimator=estimator, kl_coef=0.5)
        loss, metrics = losses.policy_loss(logp, old, ref, advantages, mask, algo, exact_kl=(reverse, forward))
        assert math.isclose(metrics["loss/kl"], float(chosen.detach()[mask].mean()), rel_tol=1e-5)
        (grad,) = torch.autograd.grad(loss, chosen)
        assert torch.allclose(grad, 0.5 * mask.float() / mask.sum())
        with pytest.raises(ValueError, match="exact_kl"):
            losses.policy_loss(logp, old, ref, advantages, mask, algo)


def test_exact_kl_loss_gradient_flows_to_logits():
    """End to end: exact_token_kl on policy logits as the in-loss term has the exact KL gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 6, (2, 3), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.ones(2, 3, dtype=torch.bool)
    algo = AlgorithmConfig(kl_mode="in_loss", kl_estimator="exact_forward", kl_coef=1.0)
    loss, _ = losses.policy_loss(logp, logp.detach(), logp.detach(), torch.zeros(2, 3), mask, algo,
                                 exact_kl=kl.exact_token_kl(logits, ref_logits, chunk_size=4))
    (grad,) = torch.autograd.grad(loss, logits)
    p, q = torch.softmax(logits, -1).detach(), torch.softmax(ref_logits, -1)
    assert torch.allclose(grad, (p - q) / 6, atol=1e-6)  # token-mean over 6 tokens of KL(q || p)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_aggregation_splits_over_micro_batches_weighted_by_units(mode):
    """The learner's contract: sum over micro-batches of agg(part) * units(part) / units(all) = agg(all),
    units = response tokens for token-mean, rows for the seq-mean modes."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 1, 3, 0, 2, 4])[:, None]

    def units(m):
        return m.sum() if mode == "token-mean" else m.shape[0]
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = sum(losses.aggregate(values[s], mask[s], mode) * units(mask[s]) / units(mask) for s in parts)
    assert torch.allclose(total, losses.aggregate(values, mask, mode))
