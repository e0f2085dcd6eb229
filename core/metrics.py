"""Pure metric functions: masked reductions, entropy, KL diagnostics, rollout and off-policy statistics.

Every `*_metrics` function returns dict[str, float] with `section/name` keys (docs/DESIGN.md).
Token means are over all response tokens of the batch (padding excluded); `*_seq_mean` keys are the mean
over sequences of the per-sequence sum, i.e. the sequence-level quantity (KL_seq is the sum of token KLs
along the sampled response).
"""
from __future__ import annotations

import torch

from core import kl as kl_lib
from core.types import RolloutBatch, TokenScores


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values where mask is true; over everything (scalar) or along `dim`. Shapes broadcast."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values where mask is true; 0 where the mask is empty (no nan)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def _entropy_chunk(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy H(softmax(logits)) = -sum_v p(v) log p(v) in nats; (..., V) -> (...), e.g. (B, T, V) -> (B, T).

    Computed in at least float32, `chunk_size` tokens at a time so the (N, V) softmax never exists for all tokens at
    once (V = 151,936 on Qwen2). Meant for logging under no_grad; it is differentiable but not
    checkpointed.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    parts = [_entropy_chunk(flat[s:s + chunk_size]) for s in range(0, flat.shape[0], chunk_size)]
    if not parts:
        return flat.new_zeros(0, dtype=torch.promote_types(flat.dtype, torch.float32)).reshape(lead)
    return torch.cat(parts).reshape(lead)


@torch.no_grad()
def kl_metrics(scores: TokenScores, response_mask: torch.Tensor) -> dict[str, float]:
    """Every KL estimator of KL(pi_old || pi_ref) beside the exact KLs, and the policy entropy.

    Keys: kl/{k1,k2,k3}_mean (token means of the sampled estimators, unclamped), kl/exact_reverse and
    kl/exact_forward (token means of the full-vocabulary KLs), kl/{k1,k3,exact_reverse,exact_forward}_seq_mean
    (mean over sequences of the per-sequence sum), entropy/token_mean (nats).
    On-policy, E[k1] = E[k3] = exact_reverse per token, so a gap between them is estimator noise or bias.
    """
    mask = response_mask.float()
    per_token = {
        "k1": kl_lib.kl_k1(scores.logprobs, scores.ref_logprobs),
        "k2": kl_lib.kl_k2(scores.logprobs, scores.ref_logprobs),
        "k3": kl_lib.kl_k3(scores.logprobs, scores.ref_logprobs),
        "exact_reverse": scores.exact_kl_reverse,
        "exact_forward": scores.exact_kl_forward,
    }
    out: dict[str, float] = {}
    for name, values in per_token.items():
        key = name if name.startswith("exact") else f"{name}_mean"
        out[f"kl/{key}"] = float(masked_mean(values.float(), mask))
        if name != "k2":
            per_seq = masked_sum(values.float(), mask, dim=1)  # (B,) sequence-level KL
            out[f"kl/{name}_seq_mean"] = float(per_seq.mean()) if per_seq.numel() else 0.0
    out["entropy/token_mean"] = float(masked_mean(scores.entropy.float(), mask))
    return out


@torch.no_grad()
def rollout_metrics(batch: RolloutBatch, rewards: torch.Tensor) -> dict[str, float]:
    """Reward and length statistics of one rollout batch; rewards (B,).

    Keys: reward/mean, reward/std (population std over the batch), response/length_mean (tokens),
    response/length_max, response/clip_ratio (fraction of rows with finish_reason == 'length').
    """
    rewards = rewards.double()
    lengths = batch.response_lengths.double()
    b = max(batch.batch_size, 1)
    return {
        "reward/mean": float(rewards.mean()) if rewards.numel() else 0.0,
        "reward/std": float(rewards.std(correction=0)) if rewards.numel() else 0.0,
        "response/length_mean": float(lengths.mean()) if lengths.numel() else 0.0,
        "response/length_max": float(lengths.max()) if lengths.numel() else 0.0,
        "response/clip_ratio": sum(r == "length" for r in batch.finish_reasons) / b,
    }


@torch.no_grad()
def offpolicy_metrics(batch: RolloutBatch, scores: TokenScores) -> dict[str, float]:
    """Gap between the sampler's (vLLM) log-probs and the learner's recomputation of the same policy.

    rollout/logprob_gap: mean |sampler_logprobs - logprobs| over response tokens (nats); near 0 when the
    weights are in sync (numerical noise only), large after a weight-sync bug.
    rollout/logprob_gap_max: the largest such gap.
    """
    mask = batch.response_mask.float()
    gap = (batch.sampler_logprobs.float() - scores.logprobs.float()).abs()
    return {
        "rollout/logprob_gap": float(masked_mean(gap, mask)),
        "rollout/logprob_gap_max": float((gap * mask).max()) if gap.numel() else 0.0,
    }
