"""Advantage estimators against hand-computed values, and the in-reward KL convention's gradient identity."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from core import advantages as adv
from core import kl
from core.types import TokenScores


def test_rloo_hand_computed_with_arbitrary_group_ids():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 1.5])
    groups = torch.tensor([7, 7, 7, 7, 3, 3])
    # R=1: others (0, 0, 1) mean 1/3 -> 2/3; R=0: others (1, 0, 1) mean 2/3 -> -2/3. Pair: -1, +1.
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, -1.0, 1.0])
    assert torch.allclose(adv.rloo_advantage(rewards, groups), expected, atol=1e-6)
    # Same as n/(n-1) (R - mean), the verl/OpenRLHF form.
    assert torch.allclose(adv.rloo_advantage(rewards[:4], groups[:4]), 4 / 3 * (rewards[:4] - 0.5), atol=1e-6)


def test_grpo_hand_computed_uses_unbiased_std_and_eps():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    std = math.sqrt(4 * 0.25 / 3)  # Bessel: sum sq dev / (n - 1)
    got = adv.grpo_advantage(rewards, groups, eps=0.1)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]) / (std + 0.1)
    expected[4:] = 0.0  # equal rewards: no signal
    assert torch.allclose(got, expected, atol=1e-6)


def test_reinforce_has_no_baseline_and_allows_single_samples():
    rewards = torch.tensor([1.0, 0.0, 3.0])
    assert torch.equal(adv.reinforce_advantage(rewards, torch.arange(3)), rewards)


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_baselines_reject_groups_of_one(name):
    with pytest.raises(ValueError, match="n_samples"):
        adv.ADVANTAGES[name](torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), 1e-6)


def test_compute_advantages_broadcasts_over_response_tokens_only():
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = adv.compute_advantages("rloo", rewards, torch.tensor([0, 0]), mask, None, 0.5, 1e-6)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]))


def test_kl_penalty_is_added_as_reward_to_go_outside_the_baseline():
    rewards = torch.tensor([1.0, 0.0])
    groups = torch.tensor([0, 0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    penalty = torch.tensor([[0.1, 0.2, 0.3, 9.0], [1.0, 2.0, 5.0, 5.0]])  # padding values must be ignored
    out = adv.compute_advantages("rloo", rewards, groups, mask, penalty, 0.5, 1e-6)
    expected = torch.tensor([[1 - 0.3, 1 - 0.25, 1 - 0.15, 0.0], [-1 - 1.5, -1 - 1.0, 0.0, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)
    # GRPO: the KL part is not divided by the group std.
    grpo = adv.compute_advantages("grpo", rewards, groups, mask, penalty, 0.5, 1e-6)
    no_kl = adv.compute_advantages("grpo", rewards, groups, mask, None, 0.5, 1e-6)
    assert torch.allclose(grpo - no_kl, expected - adv.compute_advantages("rloo", rewards, groups, mask), atol=1e-6)
    # kl_coef = 0 leaves advantages unchanged.
    assert torch.equal(adv.compute_advantages("rloo", rewards, groups, mask, penalty, 0.0),
                       adv.compute_advantages("rloo", rewards, groups, mask, None, 0.0))


def test_compute_advantages_rejects_bad_names_and_shapes():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'ppo'.*rloo.*grpo.*reinforce"):
        adv.compute_advantages("ppo", torch.zeros(2), torch.zeros(2, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="rewards"):
        adv.compute_advantages("rloo", torch.zeros(3), torch.zeros(3, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="kl_penalty"):
        adv.compute_advantages("rloo", torch.zeros(2), torch.zeros(2, dtype=torch.long), mask, torch.zeros(2, 4), 0.1)


def _two_token_policy(seed: int, vocab: int):
    """A tabular autoregressive policy over 2 tokens: logits for a1 (V,), and for a2 given a1 (V, V)."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_(True),
             torch.randn(vocab, vocab, generator=g, dtype=torch.float64).requires_grad_(True)]
    ref = [torch.randn(vocab, generator=g, dtype=torch.float64), torch.randn(vocab, vocab, generator=g,
                                                                              dtype=torch.float64)]
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=2)))  # every response, (V^2, 2)

    def logprobs(params):
        first = torch.log_softmax(params[0], -1)[seqs[:, 0]]
        second = torch.log_softmax(params[1], -1)[seqs[:, 0], seqs[:, 1]]
        return torch.stack([first, second], dim=1)  # (V^2, 2) log pi(a_t | a_<t)

    return theta, logprobs(theta), logprobs(ref), torch.rand(len(seqs), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,constant_reward", [("reinforce", False), ("rloo", True), ("grpo", True)])
def test_k1_in_reward_through_compute_advantages_gives_exact_sequence_kl_gradient(name, constant_reward):
    """E[sum_t grad log pi(a_t) A_t] = grad E[R] - beta grad KL_seq(pi || pi_ref), by enumerating responses.

    Group baselines are sample-based, so they enter exactly only when every reward in the group is equal
    (then the baseline part is 0 and only the KL reward-to-go remains).
    """
    vocab, beta = 3, 0.4
    theta, logp, ref_logp, rewards = _two_token_policy(0, vocab)
    if constant_reward:
        rewards = torch.full_like(rewards, 0.7)
    b = len(rewards)
    scores = TokenScores(logprobs=logp.detach(), ref_logprobs=ref_logp, entropy=torch.zeros(b, 2),
                         exact_kl_reverse=torch.zeros(b, 2), exact_kl_forward=torch.zeros(b, 2))
    penalty = kl.token_kl_penalty(scores, "k1", 0.0)
    mask = torch.ones(b, 2, dtype=torch.bool)
    advantages = adv.compute_advantages(name, rewards, torch.zeros(b, dtype=torch.long), mask, penalty, beta)
    seq_prob = logp.sum(-1).exp().detach()  # P(response), the enumeration weight
    surrogate = (seq_prob[:, None] * logp * advantages.double()).sum()
    seq_prob_grad = logp.sum(-1).exp()
    task_reward = (seq_prob_grad * rewards).sum() if name == "reinforce" else 0.0  # constant E[R] otherwise
    objective = task_reward - beta * (seq_prob_grad * (logp - ref_logp).sum(-1)).sum()  # E[R] - beta KL_seq
    got = torch.autograd.grad(surrogate, theta, retain_graph=True)
    want = torch.autograd.grad(objective, theta)
    for g_got, g_want in zip(got, want):
        assert torch.allclose(g_got, g_want, atol=1e-6), (g_got, g_want)


def test_forward_cumsum_would_fail_the_gradient_identity():
    """Guard that the identity above can fail: summing only past penalties (wrong direction) is biased."""
    vocab, beta = 3, 0.4
    theta, logp, ref_logp, _ = _two_token_policy(1, vocab)
    k1 = (logp - ref_logp).detach()
    wrong = -beta * k1.cumsum(-1)
    seq_prob = logp.sum(-1).exp().detach()
    got = torch.autograd.grad((seq_prob[:, None] * logp * wrong).sum(), theta, retain_graph=True)
    want = torch.autograd.grad(-beta * (logp.sum(-1).exp() * (logp - ref_logp).sum(-1)).sum(), theta)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, want))
