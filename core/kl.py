"""KL divergence between the policy pi and the frozen reference pi_ref: sampled-token estimators and the
exact token-level KL from full-vocabulary logits.

Notation (docs/CONVENTIONS.md derives the identities). Tokens a are sampled from pi, and per token
    x = log pi(a) - log pi_ref(a),    r = pi_ref(a) / pi(a) = exp(-x).
Estimators of the reverse KL(pi || pi_ref) (Schulman, "Approximating KL divergence", 2020,
http://joschu.net/blog/kl-approx.html):
    k1 = x                    unbiased, high variance, can be negative
    k2 = x^2 / 2              biased, low variance
    k3 = (r - 1) - log r      unbiased, low variance, >= 0
    k3_plus                   k3's value with k2's gradient: k2 - sg(k2) + sg(k3) (verl core_algos "k3+")
Used directly as a loss (on-policy, gradient through log pi only): E[grad k1] = 0,
E[grad k2] = grad KL(pi || pi_ref) (reverse), E[grad k3] = grad KL(pi_ref || pi) (forward).

Clamping (`clamp > 0`) clips each estimator's value to [-clamp, clamp]; clipped tokens get zero gradient
(torch.clamp), as in the peers. For k3 the log-ratio log r is first clipped to [-20, 20] before exp, so
exp cannot overflow and poison the gradient with inf * 0 = nan. How this compares with the peers:
  * verl (core_algos.kl_penalty): k1 and k2 are never clamped; k3 ("low_var_kl") clips log r to
    [-20, 20] and the value to [-10, 10]. klrl with clamp=10 matches verl's k3 exactly, and also clamps
    k1/k2 (verl does not).
  * OpenRLHF (models/utils.compute_approx_kl): every estimator's value is clipped to [-10, 10], with no
    clip before exp. klrl with clamp=10 gives the same values (k3 > 10 whenever |log r| > 20), but its
    gradient stays finite where OpenRLHF's exp overflows (log r > 88 in float32).
  * k3_plus: the value sg(k3) is clamped, the k2 gradient part is not (as verl: its "mse" has no clamp).
clamp = 0 (the klrl default) leaves every estimator exact.
"""
from __future__ import annotations

from typing import Callable

import torch

from core.types import TokenScores

# verl's clip of a log-ratio before exp (k3 here, the importance ratio in core/losses.py): exp(20) ~ 5e8
# is finite in float32, so one diverged token cannot turn a step's loss into inf.
LOG_RATIO_LIMIT = 20.0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log pi_ref(a), elementwise, nats. Schulman 2020."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi(a) - log pi_ref(a))^2 / 2, elementwise, nats. Schulman 2020."""
    return 0.5 * (logprobs - ref_logprobs).square()


def _k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, log_ratio_limit: float | None) -> torch.Tensor:
    log_r = ref_logprobs - logprobs
    if log_ratio_limit is not None:
        log_r = log_r.clamp(-log_ratio_limit, log_ratio_limit)
    # expm1 keeps (r - 1) accurate when r ~ 1, where k3 ~ x^2/2 is tiny and cancellation would dominate.
    return torch.expm1(log_r) - log_r


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(a)/pi(a), elementwise, nats, >= 0. Schulman 2020."""
    return _k3(logprobs, ref_logprobs, None)


def kl_k3_plus(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3's value with k2's gradient: k2 - sg(k2) + sg(k3) (verl core_algos, "low_var_kl+"/"k3+").

    As a loss its gradient is the unbiased reverse-KL gradient (k2's), while the logged value stays the
    low-variance unbiased k3 estimate.
    """
    k2 = kl_k2(logprobs, ref_logprobs)
    return k2 - k2.detach() + kl_k3(logprobs, ref_logprobs).detach()


SAMPLED_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k3_plus": kl_k3_plus,
}
EXACT_ESTIMATORS = ("exact_reverse", "exact_forward")
ESTIMATOR_NAMES = tuple(SAMPLED_ESTIMATORS) + EXACT_ESTIMATORS


def check_estimator(name: str, allowed: tuple[str, ...] = ESTIMATOR_NAMES) -> str:
    """Return `name` if it is a known estimator, else raise ValueError listing the valid ones."""
    if name not in allowed:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {list(allowed)}")
    return name


def sampled_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str,
               clamp: float = 0.0) -> torch.Tensor:
    """Per-token sampled KL estimate, (B, T) nats, differentiable through `logprobs`.

    logprobs: (B, T) log pi(a_t) of the sampled tokens; ref_logprobs: (B, T) log pi_ref(a_t).
    estimator: one of k1, k2, k3, k3_plus. clamp > 0 clips the value to [-clamp, clamp] (see module
    docstring for the comparison with verl and OpenRLHF). Padding is not masked here: callers mask.
    """
    check_estimator(estimator, tuple(SAMPLED_ESTIMATORS))
    if clamp < 0:
        raise ValueError(f"clamp must be >= 0 (0 disables), got {clamp}")
    if clamp == 0:
        return SAMPLED_ESTIMATORS[estimator](logprobs, ref_logprobs)
    if estimator == "k3":
        return _k3(logprobs, ref_logprobs, LOG_RATIO_LIMIT).clamp(-clamp, clamp)
    if estimator == "k3_plus":
        k2 = kl_k2(logprobs, ref_logprobs)
        k3 = _k3(logprobs, ref_logprobs, LOG_RATIO_LIMIT).clamp(-clamp, clamp)
        return k2 - k2.detach() + k3.detach()
    return SAMPLED_ESTIMATORS[estimator](logprobs, ref_logprobs).clamp(-clamp, clamp)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 logits lose the small differences a KL is made of."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _exact_kl_chunk(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits -> (reverse, forward), each (N,), in at least float32."""
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    logq = torch.log_softmax(_upcast(ref_logits), dim=-1)
    diff = logp - logq
    reverse = (logp.exp() * diff).sum(-1)  # sum_v pi (log pi - log pi_ref)
    forward = -(logq.exp() * diff).sum(-1)  # sum_v pi_ref (log pi_ref - log pi)
    return reverse, forward


class _ExactTokenKL(torch.autograd.Function):
    """Exact KLs of one chunk with a closed-form backward that recomputes the softmaxes.

    Autograd keeps only the chunk's logits (a view of the caller's tensor), not the (N, V) softmax
    intermediates, so memory stays bounded by one chunk. Gradients w.r.t. the policy logits z, with
    p = softmax(z), q = softmax(z_ref), d = log p - log q:
        d KL(p || q) / dz = p * (d - sum_v p d)        d KL(q || p) / dz = p - q
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ref_logits: torch.Tensor):  # noqa: D102 - see class docstring
        ctx.save_for_backward(logits, ref_logits)
        return _exact_kl_chunk(logits, ref_logits)

    @staticmethod
    def backward(ctx, grad_reverse: torch.Tensor, grad_forward: torch.Tensor):  # noqa: D102
        logits, ref_logits = ctx.saved_tensors
        logp = torch.log_softmax(_upcast(logits), dim=-1)
        logq = torch.log_softmax(_upcast(ref_logits), dim=-1)
        p = logp.exp()
        d = logp - logq
        grad = grad_reverse.to(p.dtype)[:, None] * p * (d - (p * d).sum(-1, keepdim=True))
        grad = grad + grad_forward.to(p.dtype)[:, None] * (p - logq.exp())
        return grad.to(logits.dtype), None


def exact_token_kl(logits: torch.Tensor, ref_logits: torch.Tensor,
                   chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact token-level KL in both directions from full-vocabulary logits.

    logits, ref_logits: (..., V), typically (B, T, V) at the response positions; any float dtype
    (computed in float32, or float64 for float64 input). Returns (reverse, forward), each of shape
    logits.shape[:-1], in nats:
        reverse[t] = KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v))
        forward[t] = KL(pi_ref || pi) = sum_v pi_ref(v) (log pi_ref(v) - log pi(v))
    Differentiable through `logits` (ref_logits is treated as frozen and detached).

    Memory: tokens are processed `chunk_size` at a time, and with gradient each chunk is an autograd
    Function whose backward recomputes its softmaxes (closed form, `_ExactTokenKL`), so autograd keeps no
    (N, V) intermediates: peak extra memory is a few chunk_size * V float32 buffers instead of several
    B * T * V ones (V = 151,936 on Qwen2).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat, ref_flat = logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab)
    grad = torch.is_grad_enabled() and logits.requires_grad
    reverse, forward = [], []
    for start in range(0, flat.shape[0], chunk_size):
        piece, ref_piece = flat[start:start + chunk_size], ref_flat[start:start + chunk_size]
        rev, fwd = _ExactTokenKL.apply(piece, ref_piece) if grad else _exact_kl_chunk(piece, ref_piece)
        reverse.append(rev)
        forward.append(fwd)
    if not reverse:  # zero tokens
        empty = _upcast(flat.new_zeros(0))
        return empty.reshape(lead), empty.reshape(lead)
    return torch.cat(reverse).reshape(lead), torch.cat(forward).reshape(lead)


def token_kl_penalty(scores: TokenScores, estimator: str, clamp: float = 0.0) -> torch.Tensor:
    """The per-token KL that kl_mode=in_reward subtracts (times beta) from the reward; (B, T) nats,
    detached (a reward carries no gradient).

    k1/k2/k3 are computed from the learner's log-probs of the behaviour policy (`scores.logprobs`) and
    the reference's; exact_reverse/exact_forward are the full-vocabulary KLs already in `scores`.
    `clamp` applies to every estimator alike. k3_plus is rejected: it differs from k3 only in its
    gradient, which a reward does not have (Config rejects it too). Padding is not masked here.
    """
    check_estimator(estimator)
    if estimator == "k3_plus":
        raise ValueError("KL estimator 'k3_plus' only changes a loss term's gradient; in the reward use "
                         f"one of {[n for n in ESTIMATOR_NAMES if n != 'k3_plus']}")
    with torch.no_grad():
        if estimator == "exact_reverse":
            kl = scores.exact_kl_reverse.float()
        elif estimator == "exact_forward":
            kl = scores.exact_kl_forward.float()
        else:
            return sampled_kl(scores.logprobs.float(), scores.ref_logprobs.float(), estimator, clamp)
        return kl.clamp(-clamp, clamp) if clamp > 0 else kl.clone()
