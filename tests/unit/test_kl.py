"""KL estimators against exact KLs: expectations (exact enumeration and Monte Carlo) and gradient identities.

Gradient identities are checked exactly by enumerating a small vocabulary and weighting each token's
gradient by sg(pi(a)) (the expectation over a ~ pi, without sampling noise); Schulman 2020 and
docs/CONVENTIONS.md give the identities.
"""
from __future__ import annotations

import math

import pytest
import torch

from core import kl
from core.types import TokenScores

V = 7
TOL = dict(atol=1e-10, rtol=1e-8)


def _policy_pair(seed: int, vocab: int = V, scale: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = (scale * torch.randn(vocab, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = scale * torch.randn(vocab, generator=g, dtype=torch.float64)
    return theta, ref


def _exact(theta: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation: (reverse, forward) KL between softmax(theta) and softmax(ref)."""
    logp, logq = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
    return (logp.exp() * (logp - logq)).sum(), (logq.exp() * (logq - logp)).sum()


def _expected_grad(theta: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """sum_a sg(pi(a)) grad_theta k(a): the on-policy expected gradient of the estimator used as a loss."""
    logp = torch.log_softmax(theta, -1)
    logq = torch.log_softmax(ref, -1)
    per_token = kl.sampled_kl(logp, logq, estimator)
    (grad,) = torch.autograd.grad((logp.exp().detach() * per_token).sum(), theta)
    return grad


def _grad(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, theta, retain_graph=True)[0]


@pytest.mark.parametrize("seed", range(5))
def test_k1_and_k3_are_exactly_unbiased_and_k2_has_its_known_expectation(seed):
    theta, ref = _policy_pair(seed)
    logp, logq = torch.log_softmax(theta, -1).detach(), torch.log_softmax(ref, -1)
    p = logp.exp()
    reverse, _ = _exact(theta.detach(), ref)
    assert torch.allclose((p * kl.sampled_kl(logp, logq, "k1")).sum(), reverse, **TOL)
    assert torch.allclose((p * kl.sampled_kl(logp, logq, "k3")).sum(), reverse, **TOL)
    assert torch.allclose((p * kl.sampled_kl(logp, logq, "k2")).sum(), (p * 0.5 * (logp - logq) ** 2).sum(), **TOL)
    # k2 is biased: its expectation is not the KL for these far-apart distributions.
    assert abs(float((p * kl.sampled_kl(logp, logq, "k2")).sum() - reverse)) > 1e-3


@pytest.mark.parametrize("seed", range(3))
def test_monte_carlo_means_match_exact_kl_within_standard_errors(seed):
    theta, ref = _policy_pair(seed, vocab=11, scale=1.0)
    logp, logq = torch.log_softmax(theta.detach(), -1), torch.log_softmax(ref, -1)
    reverse, _ = _exact(theta.detach(), ref)
    k2_expected = (logp.exp() * 0.5 * (logp - logq) ** 2).sum()
    g = torch.Generator().manual_seed(100 + seed)
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    for estimator, target in (("k1", reverse), ("k3", reverse), ("k2", k2_expected)):
        values = kl.sampled_kl(logp[samples], logq[samples], estimator)
        stderr = values.std() / math.sqrt(values.numel())
        assert abs(float(values.mean() - target)) < 4 * float(stderr), estimator
    # k3's variance is lower than k1's when the distributions are close (Schulman 2020).
    near_q = torch.log_softmax(theta.detach() + 0.1 * torch.randn(11, generator=g, dtype=torch.float64), -1)
    k1 = kl.sampled_kl(logp[samples], near_q[samples], "k1")
    k3 = kl.sampled_kl(logp[samples], near_q[samples], "k3")
    assert k3.var() < k1.var()


def test_k3_is_nonnegative_and_zero_only_when_equal():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(10_000, generator=g) * 30
    logq = -torch.rand(10_000, generator=g) * 30
    for clamp in (0.0, 10.0):
        values = kl.sampled_kl(logp, logq, "k3", clamp)
        assert torch.isfinite(values).all() and (values >= 0).all()
    assert torch.equal(kl.sampled_kl(logp, logp, "k3"), torch.zeros_like(logp))
    # expm1 keeps tiny k3 accurate: k3 ~ x^2/2 for |x| = 1e-4.
    tiny = kl.sampled_kl(torch.tensor([-1.0]), torch.tensor([-1.0001]), "k3")
    assert math.isclose(float(tiny), 0.5e-8, rel_tol=1e-2)


@pytest.mark.parametrize("seed", range(4))
def test_estimator_gradient_identities_exactly(seed):
    theta, ref = _policy_pair(seed)
    reverse, forward = _exact(theta, ref)
    grad_reverse, grad_forward = _grad(reverse, theta), _grad(forward, theta)
    assert not torch.allclose(grad_reverse, grad_forward, atol=1e-3)  # the identities below can tell apart
    # k1 as a loss: E[grad k1] = E[grad log pi] = 0.
    assert torch.allclose(_expected_grad(theta, ref, "k1"), torch.zeros(V, dtype=torch.float64), atol=1e-12)
    # k2 as a loss: E[grad k2] = grad KL(pi || pi_ref).
    assert torch.allclose(_expected_grad(theta, ref, "k2"), grad_reverse, **TOL)
    # k3 as a loss (sampled from pi, no importance correction): E[grad k3] = grad KL(pi_ref || pi).
    assert torch.allclose(_expected_grad(theta, ref, "k3"), grad_forward, **TOL)
    # k3_plus: k3's value, k2's gradient.
    assert torch.allclose(_expected_grad(theta, ref, "k3_plus"), grad_reverse, **TOL)
    logp = torch.log_softmax(theta, -1)
    logq = torch.log_softmax(ref, -1)
    assert torch.allclose(kl.sampled_kl(logp, logq, "k3_plus"), kl.sampled_kl(logp, logq, "k3"), **TOL)


@pytest.mark.parametrize("seed", range(4))
def test_k1_in_reward_score_function_gives_minus_beta_grad_reverse_kl(seed):
    theta, ref = _policy_pair(seed)
    beta = 0.3
    logp, logq = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
    reward = -beta * kl.sampled_kl(logp, logq, "k1").detach()  # a reward carries no gradient
    surrogate = (logp.exp().detach() * logp * reward).sum()  # E_pi[log pi(a) * R(a)], REINFORCE
    reverse, forward = _exact(theta, ref)
    assert torch.allclose(_grad(surrogate, theta), -beta * _grad(reverse, theta), **TOL)
    assert not torch.allclose(_grad(surrogate, theta), -beta * _grad(forward, theta), atol=1e-3)


def test_exact_token_kl_matches_closed_form_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, V, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(3, 4, V, generator=g, dtype=torch.float64)
    reverse, forward = kl.exact_token_kl(logits, ref_logits, chunk_size=5)
    assert reverse.shape == forward.shape == (3, 4)
    p, q = torch.softmax(logits, -1).detach(), torch.softmax(ref_logits, -1)
    torch_forward = torch.nn.functional.kl_div(torch.log(p), q, reduction="none").sum(-1)
    assert torch.allclose(forward.double(), torch_forward.double(), atol=1e-5)
    d = torch.log(p) - torch.log(q)
    assert torch.allclose(reverse.double(), (p * d).sum(-1), atol=1e-5)
    # d/dlogits KL(pi || q) = p * (d - sum p d);  d/dlogits KL(q || pi) = p - q.
    (g_rev,) = torch.autograd.grad(reverse.sum(), logits, retain_graph=True)
    (g_fwd,) = torch.autograd.grad(forward.sum(), logits)
    assert torch.allclose(g_rev, p * (d - (p * d).sum(-1, keepdim=True)), atol=1e-5)
    assert torch.allclose(g_fwd, p - q, atol=1e-5)
    assert (reverse >= -1e-6).all() and (forward >= -1e-6).all()
    # The hand-written backward against finite differences, and against autograd of the naive formula.
    small = logits.detach()[:1, :3, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: kl.exact_token_kl(z, ref_logits[:1, :3, :4], chunk_size=2),
                                    (small,), fast_mode=True)
    naive_p = torch.log_softmax(logits, -1)
    naive = (naive_p.exp() * (naive_p - q.log())).sum() + 2 * (q * (q.log() - naive_p)).sum()
    reverse, forward = kl.exact_token_kl(logits, ref_logits, chunk_size=5)
    (g_mixed,) = torch.autograd.grad((reverse + 2 * forward).sum(), logits)
    assert torch.allclose(g_mixed, torch.autograd.grad(naive, logits)[0], atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_chunked_exact_kl_equals_unchunked(chunk_size):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 13, generator=g)
    ref_logits = torch.randn(2, 5, 13, generator=g)
    outs = []
    for size in (chunk_size, 10_000):
        logits = base.clone().requires_grad_(True)
        reverse, forward = kl.exact_token_kl(logits, ref_logits, chunk_size=size)
        (0.7 * reverse.sum() + 1.3 * forward.sum()).backward()
        outs.append((reverse.detach(), forward.detach(), logits.grad))
    for chunked, whole in zip(*outs):
        assert torch.allclose(chunked, whole, atol=1e-6)
    with torch.no_grad():
        reverse, _ = kl.exact_token_kl(base, ref_logits, chunk_size=chunk_size)
    assert torch.allclose(reverse, outs[1][0], atol=1e-6)


def test_exact_kl_upcasts_bfloat16_and_rejects_bad_input():
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    reverse, forward = kl.exact_token_kl(logits, logits.clone(), chunk_size=2)
    assert reverse.dtype == torch.float32 and torch.allclose(reverse, torch.zeros(2, 3), atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        kl.exact_token_kl(logits, logits, chunk_size=0)
    with pytest.raises(ValueError, match="differ"):
        kl.exact_token_kl(logits, logits[:, :2], chunk_size=2)


def test_clamp_limits_values_and_zeroes_gradient_outside():
    logp = torch.tensor([-1.0, -1.0, -30.0, -1.0], requires_grad=True)
    logq = torch.tensor([-1.5, -25.0, -1.0, -1.0])
    for estimator in ("k1", "k2", "k3"):
        values = kl.sampled_kl(logp, logq, estimator, clamp=2.0)
        assert (values.abs() <= 2.0).all(), estimator
        (grad,) = torch.autograd.grad(values.sum(), logp)
        assert torch.isfinite(grad).all() and grad[1] == 0 and grad[2] == 0, estimator
        assert grad[0] != 0 or estimator == "k1" and grad[0] == 1
    # Unclamped k3 at log r = 29 is huge but finite; clamped, it is exactly the clamp.
    assert kl.sampled_kl(logp, logq, "k3")[2] > 1e12
    assert kl.sampled_kl(logp, logq, "k3", clamp=10.0)[2] == 10.0
    # k3_plus: value clamped like k3, gradient still k2's.
    plus = kl.sampled_kl(logp, logq, "k3_plus", clamp=2.0)
    assert torch.allclose(plus, kl.sampled_kl(logp, logq, "k3", clamp=2.0))
    (grad,) = torch.autograd.grad(plus.sum(), logp)
    assert torch.allclose(grad, (logp - logq).detach())
    with pytest.raises(ValueError, match="clamp"):
        kl.sampled_kl(logp, logq, "k1", clamp=-1.0)


def test_unknown_estimator_lists_valid_names():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"'k4'.*k1.*k2.*k3.*k3_plus"):
        kl.sampled_kl(x, x, "k4")
    with pytest.raises(ValueError, match="exact_forward"):
        kl.check_estimator("kl")
    with pytest.raises(ValueError, match="k1"):  # exact KLs cannot come from sampled log-probs
        kl.sampled_kl(x, x, "exact_reverse")


def _scores(seed: int = 0) -> TokenScores:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(2, 4, generator=g) * 3
    return TokenScores(logprobs=lp.requires_grad_(True), ref_logprobs=-torch.rand(2, 4, generator=g) * 3,
                       entropy=torch.rand(2, 4, generator=g), exact_kl_reverse=torch.rand(2, 4, generator=g),
                       exact_kl_forward=torch.rand(2, 4, generator=g) + 1)


def test_token_kl_penalty_selects_estimator_and_is_detached():
    s = _scores()
    for estimator in ("k1", "k2", "k3"):
        penalty = kl.token_kl_penalty(s, estimator, 0.0)
        assert not penalty.requires_grad
        assert torch.allclose(penalty, kl.sampled_kl(s.logprobs, s.ref_logprobs, estimator))
    assert torch.equal(kl.token_kl_penalty(s, "exact_reverse", 0.0), s.exact_kl_reverse)
    assert torch.equal(kl.token_kl_penalty(s, "exact_forward", 0.0), s.exact_kl_forward)
    assert kl.token_kl_penalty(s, "exact_forward", 1.2).max() <= 1.2
    assert kl.token_kl_penalty(s, "k2", 0.1).max() <= 0.1
    with pytest.raises(ValueError, match="k3_plus"):
        kl.token_kl_penalty(s, "k3_plus", 0.0)
    with pytest.raises(ValueError, match="valid"):
        kl.token_kl_penalty(s, "nope", 0.0)
