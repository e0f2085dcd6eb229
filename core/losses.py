"""PPO clipped policy loss, loss aggregation, and the in-loss KL penalty.

    loss = agg(pg_t) + beta * agg(w_t * kl_t)      (the KL term only when algorithm.kl_mode == "in_loss")

pg_t is PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with DAPO's asymmetric clip-higher
(Yu et al. 2025) and dual-clip for negative advantages (Ye et al. 2020, "Mastering Complex Control in MOBA
Games", eq. 5), written as in verl core_algos.compute_policy_loss. kl_t is the configured estimator
(core.kl); w_t = pi/pi_old (kept in the graph) when algorithm.kl_importance_correction, else 1.
"""
from __future__ import annotations

from typing import Callable

import torch

from core import kl as kl_lib
from core.config import AlgorithmConfig
from core.metrics import masked_mean


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(values, mask)


def _seq_mean_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1).sum() / max(values.shape[0], 1)


def _seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # an empty row contributes 0, not nan
    return per_seq.sum() / max(values.shape[0], 1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
}


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce per-token values (B, T) to a scalar over the tokens where mask is true.

    token-mean           sum_{b,t} v m / sum_{b,t} m: every token of the batch weighs the same (verl's
                         default, DAPO). Long responses weigh more in total.
    seq-mean-token-sum   mean over sequences of sum_t v m: each sequence's sum (Dr. GRPO-like without the
                         constant length normaliser).
    seq-mean-token-mean  mean over sequences of (sum_t v m / sum_t m): each sequence weighs the same
                         (original GRPO).
    Denominators: token-mean divides by the number of response tokens, the seq-mean modes by the number of
    rows B (as verl; a row with no response token counts, contributing 0). An empty mask gives 0, not nan.
    Each mode is computed over the (micro-)batch it is given; the learner re-weights micro-batches by
    tokens resp. rows so the sum equals the aggregate over the whole mini-batch.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {list(AGGREGATIONS)}")
    return AGGREGATIONS[mode](values, mask.to(values.dtype))


def ppo_clip_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float, clip_eps_high: float = 0.0,
                        dual_clip: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped loss (B, T) and per-token diagnostics (B, T) (unmasked).

    ratio = exp(log pi - log pi_old); loss = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high)),
    eps_high = clip_eps_high or clip_eps. The gradient is 0 where the clipped branch is active: ratio >
    1 + eps_high with A > 0, ratio < 1 - eps_low with A < 0. Dual clip (c > 1): for A < 0 the loss is
    additionally capped at -A c, so a token with a huge ratio and A < 0 stops pushing (zero gradient).
    """
    hi = clip_eps_high if clip_eps_high > 0 else clip_eps
    log_ratio = (logprobs - old_logprobs).clamp(-kl_lib.LOG_RATIO_LIMIT, kl_lib.LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + hi)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip > 0:
        cap = -advantages * dual_clip
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    return loss, {"ratio": ratio.detach(), "log_ratio": log_ratio.detach(), "clipped": clipped,
                  "dual_clipped": dual}


def in_loss_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               algo: AlgorithmConfig,
               exact_kl: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token KL term (B, T) for kl_mode=in_loss, before aggregation and beta.

    k1/k2/k3/k3_plus come from the sampled log-probs (core.kl.sampled_kl with algo.kl_clamp);
    exact_reverse/exact_forward take exact_kl = (reverse, forward), (B, T) each, which must carry the
    policy's gradient (core.kl.exact_token_kl on the current logits).
    Importance correction (algo.kl_importance_correction; Zhang et al. 2025, arXiv 2505.17508, and the
    DeepSeek-V3.2 KL term): sampled estimators are weighted by w = pi/pi_old with the ratio *in the graph*.
    Then E_{pi_old}[w k] = E_pi[k] for any sampling policy, and its gradient is the gradient of the KL the
    estimator measures: for k3, grad E_pi[k3] = grad KL(pi || pi_ref), the unbiased reverse-KL gradient
    (at pi = pi_old: grad[w k3] = (k3 + 1 - r) grad log pi, whose expectation is E_pi[x grad log pi]).
    Without it, k3 in the loss has the forward-KL gradient (SCIENCE.md), which is what the seed study's
    "forward-KL style" arm measures; the corrected variant is the control that removes that bias.
    It is not applied to the exact KLs, which already sum over the vocabulary at each state (there is no
    sampled token to reweight). The value is unchanged on-policy (w = 1); the gradient is not.
    """
    estimator = kl_lib.check_estimator(algo.kl_estimator)
    if estimator in kl_lib.EXACT_ESTIMATORS:
        if exact_kl is None:
            raise ValueError(f"algorithm.kl_estimator={estimator!r} with kl_mode='in_loss' needs exact_kl="
                             "(reverse, forward) computed from the policy's logits")
        kl = exact_kl[0] if estimator == "exact_reverse" else exact_kl[1]
        return kl.clamp(-algo.kl_clamp, algo.kl_clamp) if algo.kl_clamp > 0 else kl
    kl = kl_lib.sampled_kl(logprobs, ref_logprobs, estimator, algo.kl_clamp)
    if algo.kl_importance_correction:
        log_w = (logprobs - old_logprobs).clamp(-kl_lib.LOG_RATIO_LIMIT, kl_lib.LOG_RATIO_LIMIT)
        kl = log_w.exp() * kl
    return kl


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                advantages: torch.Tensor, response_mask: torch.Tensor, algo: AlgorithmConfig,
                exact_kl: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped loss plus, when algo.kl_mode == "in_loss", beta * the aggregated KL term.

    logprobs: (B, T) log pi_theta(a_t), with gradient. old_logprobs: (B, T) log pi_old(a_t) from scoring.
    ref_logprobs: (B, T) log pi_ref(a_t). advantages: (B, T) (in-reward KL already folded in).
    response_mask: (B, T). exact_kl: (reverse, forward) (B, T) with gradient, needed only for the exact
    estimators in the loss. Returns (scalar loss, metrics) with metrics:
      loss/policy, loss/kl (aggregated KL term, before beta; 0 unless in_loss), loss/total,
      ppo/clip_frac (tokens whose clipped branch is active, i.e. zero gradient), ppo/dual_clip_frac,
      ppo/approx_kl (k3 estimate of KL(pi_old || pi_theta), Schulman 2020), ppo/ratio_mean, ppo/ratio_max.
    """
    mask = response_mask.to(logprobs.dtype)
    old_logprobs, ref_logprobs, advantages = old_logprobs.detach(), ref_logprobs.detach(), advantages.detach()
    pg, diag = ppo_clip_token_loss(logprobs, old_logprobs, advantages, algo.clip_eps, algo.clip_eps_high,
                                   algo.dual_clip)
    pg_loss = aggregate(pg, mask, algo.loss_agg)
    loss = pg_loss
    kl_loss = torch.zeros((), dtype=pg_loss.dtype)
    if algo.kl_mode == "in_loss":
        kl_loss = aggregate(in_loss_kl(logprobs, old_logprobs, ref_logprobs, algo, exact_kl), mask, algo.loss_agg)
        loss = loss + algo.kl_coef * kl_loss
    with torch.no_grad():
        log_ratio = diag["log_ratio"]
        metrics = {
            "loss/policy": float(pg_loss.detach()),
            "loss/kl": float(kl_loss.detach()),
            "loss/total": float(loss.detach()),
            "ppo/clip_frac": float(masked_mean(diag["clipped"].float(), mask)),
            "ppo/dual_clip_frac": float(masked_mean(diag["dual_clipped"].float(), mask)),
            "ppo/approx_kl": float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask)),
            "ppo/ratio_mean": float(masked_mean(diag["ratio"], mask)),
            "ppo/ratio_max": float((diag["ratio"] * mask).max()) if mask.numel() else 0.0,
        }
    return loss, metrics
