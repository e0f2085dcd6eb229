"""Advantages for critic-free policy gradients with a group baseline, and the in-reward KL penalty.

A batch holds B = prompts * n rows; rows answering the same prompt share a `group_index` value (groups are
contiguous in klrl, but nothing here relies on it). Each estimator maps the scalar task rewards (B,) to a
per-sequence advantage (B,); `compute_advantages` broadcasts it over the response tokens and, with
kl_mode=in_reward, adds the KL penalty as a per-token reward-to-go.

Registry (`ADVANTAGES`, keyed by `algorithm.advantage`):
  rloo       A_i = R_i - mean_{j != i} R_j  (leave-one-out; Kool et al. 2019, "Buy 4 REINFORCE samples,
             get a baseline for free"; Ahmadian et al. 2024). Identical to n/(n-1) * (R_i - mean_j R_j),
             which is how verl and OpenRLHF write it; no further scaling.
  grpo       A_i = (R_i - mean R) / (std R + eps), std with Bessel's correction (unbiased, as torch.std,
             verl and TRL); Shao et al. 2024 (DeepSeekMath) eq. 3.
  reinforce  A_i = R_i: no baseline (Williams 1992). Chosen over a group-mean baseline so that the arm is
             the plain unbiased estimator and works with n_samples = 1 (which Config allows for it);
             it is the high-variance control, not a recommended setting.

KL in the reward (kl_mode=in_reward), klrl's convention (OpenRLHF-like):
  The group baseline/normalisation is applied to the task reward only. The per-token penalty
  c_t = -beta * kl_t is then added to the advantage as reward-to-go with gamma = 1:
      A_{i,t} = A_i + sum_{t' >= t} c_{i,t'}.
  With kl = k1 this makes the score-function gradient E[sum_t grad log pi(a_t) A_t] equal to
  grad E[R] - beta * grad KL_seq(pi || pi_ref), the exact (unbiased) sequence-level reverse-KL gradient:
  grad E_pi[sum_t k1_t] = E[sum_t grad log pi(a_t) sum_{t'} k1_{t'}] + E[sum_t grad k1_t], the second term
  is E[grad log pi] = 0, and by causality sum_{t'} may be cut to sum_{t' >= t} (lower variance).
  The KL part is neither leave-one-out-baselined nor divided by the GRPO std.
  How verl differs: it subtracts beta * kl per token from the token-level reward, then RLOO/GRPO *sum the
  token rewards per sequence* and baseline that sum, so the KL is inside the leave-one-out baseline (and
  inside GRPO's std) and every token of a sequence gets the same advantage (no reward-to-go). Both are
  unbiased for k1 with RLOO; verl's has higher variance and, with GRPO, rescales beta by 1/std.
"""
from __future__ import annotations

from typing import Callable

import torch


def _group_sums(values: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group sum, group count and the inverse index, from arbitrary group ids; values (B,)."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = values.new_zeros(n_groups).index_add_(0, inverse, values)
    counts = values.new_zeros(n_groups).index_add_(0, inverse, torch.ones_like(values))
    return sums[inverse], counts[inverse], inverse


def _require_groups_of_two(counts: torch.Tensor, name: str) -> None:
    if counts.numel() and bool((counts < 2).any()):
        raise ValueError(f"advantage={name!r} needs >= 2 samples per group (rollout.n_samples >= 2); "
                         f"got a group of {int(counts.min())}")


def rloo_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Leave-one-out baseline: A_i = R_i - (sum_group R - R_i) / (n - 1). rewards (B,) -> (B,).

    Kool et al. 2019 / Ahmadian et al. 2024 (RLOO); equals n/(n-1) (R_i - mean R) as in verl and OpenRLHF.
    `eps` is unused (uniform signature).
    """
    rewards = rewards.double()
    sums, counts, _ = _group_sums(rewards, group_index)
    _require_groups_of_two(counts, "rloo")
    return (rewards - (sums - rewards) / (counts - 1)).float()


def grpo_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised reward: A_i = (R_i - mean R) / (std R + eps), std unbiased. (B,) -> (B,).

    Shao et al. 2024 (DeepSeekMath, GRPO outcome supervision). A group with equal rewards gets A = 0.
    """
    rewards = rewards.double()
    sums, counts, inverse = _group_sums(rewards, group_index)
    _require_groups_of_two(counts, "grpo")
    mean = sums / counts
    sq_dev = (rewards - mean).square()
    var = sq_dev.new_zeros(int(inverse.max()) + 1 if inverse.numel() else 0).index_add_(0, inverse, sq_dev)
    std = (var[inverse] / (counts - 1)).sqrt()
    return ((rewards - mean) / (std + eps)).float()


def reinforce_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """No baseline: A_i = R_i (Williams 1992). (B,) -> (B,). Unbiased, highest variance; works with n = 1."""
    return rewards.float().clone()


ADVANTAGES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "rloo": rloo_advantage,
    "grpo": grpo_advantage,
    "reinforce": reinforce_advantage,
}


def reward_to_go(token_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """sum_{t' >= t} token_rewards[:, t'] over response tokens (gamma = 1); (B, T) -> (B, T), 0 on padding."""
    masked = token_rewards * response_mask
    return masked.flip(-1).cumsum(-1).flip(-1) * response_mask


def compute_advantages(name: str, rewards: torch.Tensor, group_index: torch.Tensor, response_mask: torch.Tensor,
                       kl_penalty: torch.Tensor | None = None, kl_coef: float = 0.0,
                       eps: float = 1e-6) -> torch.Tensor:
    """Per-token advantages (B, T) float32, 0 on padding.

    name: a key of ADVANTAGES. rewards: (B,) task reward per sequence. group_index: (B,) prompt id per row.
    response_mask: (B, T) bool/0-1. kl_penalty: (B, T) per-token KL (nats, e.g. from
    core.kl.token_kl_penalty) or None; when given, -kl_coef * kl_penalty is added as reward-to-go after the
    group baseline (see the module docstring for this convention and how verl differs). eps: GRPO's std eps.
    """
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {list(ADVANTAGES)}")
    if rewards.shape != (response_mask.shape[0],) or group_index.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must be "
                         f"(B,) with B = response_mask rows ({response_mask.shape[0]})")
    mask = response_mask.float()
    advantages = ADVANTAGES[name](rewards.detach(), group_index, eps)[:, None] * mask
    if kl_penalty is not None and kl_coef != 0:
        if kl_penalty.shape != response_mask.shape:
            raise ValueError(f"kl_penalty {tuple(kl_penalty.shape)} must match response_mask "
                             f"{tuple(response_mask.shape)}")
        advantages = advantages + reward_to_go(-kl_coef * kl_penalty.detach().float(), mask)
    return advantages
