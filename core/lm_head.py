"""Per-token log-probs, entropy and exact KL from final hidden states, without full-vocabulary logits.

A causal LM's logits are `hidden @ W.T` (W: the (V, H) output embedding, tied to the input embedding or
not). Materialising them for a micro-batch costs B * T * V floats: V = 151,936 on Qwen2, so 1.2 GB per
2,048 tokens in float32, several times over once the softmax and the backward's copies are counted
(verl issue #2828 is this out-of-memory). Here the response tokens are processed `chunk_size` at a time:

  forward   a chunk's logits -> float32 / temperature -> log-softmax -> the chunk's per-token values;
  backward  each chunk is checkpointed (torch.utils.checkpoint): its logits are recomputed from its
            hidden states and `_LogProbKL`'s closed-form backward turns them into d loss / d logits.

Nothing of size (chunk, V) outlives its chunk, so the extra memory is a few chunk_size * V float32
buffers whatever the sequence length. The reference model's logits enter the same chunk (the exact KL
needs both distributions at once) and are recomputed in the backward, never kept.

The head is called as a module (`head(hidden_chunk)`), not read as a weight, so a tied embedding gets
its gradient from both uses and DeepSpeed ZeRO-3 gathers the sharded weight around every call. Values
equal the unchunked computation (full logits, core.kl.exact_token_kl, core.metrics.entropy_from_logits)
up to float summation order: tests/unit/test_lm_head.py checks values and gradients within 1e-6.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # (n, H) hidden -> (n, V) logits, e.g. model.lm_head


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """At least float32 logits divided by the sampling temperature (the distribution vLLM sampled from)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits / temperature if temperature != 1.0 else logits


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[n, v] * b[n, v] -> (n,), as a batched matmul so no (n, V) product is allocated."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(-1)


def _chunk_values(logits: torch.Tensor, ref_logits: torch.Tensor | None, tokens: torch.Tensor,
                  temperature: float, entropy: bool) -> dict[str, torch.Tensor]:
    """One chunk's per-token values, each (n,) float32; logits (n, V) in any dtype, tokens (n,) long.

    Keys: logprobs, and entropy when asked; with reference logits also ref_logprobs, kl_reverse =
    KL(pi || pi_ref) and kl_forward = KL(pi_ref || pi) (nats, core.kl.exact_token_kl's definitions).
    """
    logp = torch.log_softmax(_scaled(logits, temperature), dim=-1)  # (n, V)
    out = {"logprobs": logp.gather(-1, tokens[:, None])[:, 0]}
    p = logp.exp()
    if entropy:
        out["entropy"] = -_rowdot(p, logp)
    if ref_logits is not None:
        logq = torch.log_softmax(_scaled(ref_logits, temperature), dim=-1)
        out["ref_logprobs"] = logq.gather(-1, tokens[:, None])[:, 0]
        d = logp.sub_(logq)  # log p - log q, in place: log p itself is not needed any more
        out["kl_reverse"] = _rowdot(p, d)
        out["kl_forward"] = -_rowdot(logq.exp_(), d)
    return out


class _LogProbKL(torch.autograd.Function):
    """log pi(a) of one chunk and, given reference logits, both exact KLs (and log pi_ref(a), without
    gradient), with a closed-form backward.

    With z = logits / temperature, p = softmax(z), q = softmax(z_ref), d = log p - log q:
        d log p(a) / dz = onehot(a) - p
        d KL(p || q) / dz = p * (d - sum_v p d)
        d KL(q || p) / dz = p - q
    and d / d logits = (d / dz) / temperature, cast back to the logits' dtype (as `.float()`'s backward
    does). Only the inputs are saved; the softmaxes are recomputed in the backward.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, tokens, temperature):  # noqa: D102 - see class docstring
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, ref_logits, tokens)
        ctx.temperature = temperature
        values = _chunk_values(logits, ref_logits, tokens, temperature, entropy=False)
        if ref_logits is None:
            return values["logprobs"]
        ctx.mark_non_differentiable(values["ref_logprobs"])
        return values["logprobs"], values["kl_reverse"], values["kl_forward"], values["ref_logprobs"]

    @staticmethod
    def backward(ctx, g_lp, g_rev=None, g_fwd=None, _g_ref=None):  # noqa: D102
        logits, ref_logits, tokens = ctx.saved_tensors
        temperature = ctx.temperature
        logp = torch.log_softmax(_scaled(logits, temperature), dim=-1)  # (n, V)
        p = logp.exp()
        zeros = logp.new_zeros(logp.shape[0])
        g_lp = zeros if g_lp is None else g_lp.to(p.dtype)
        if ref_logits is None or (g_rev is None and g_fwd is None):
            grad = p.mul_(-g_lp[:, None])
        else:
            g_rev = zeros if g_rev is None else g_rev.to(p.dtype)
            g_fwd = zeros if g_fwd is None else g_fwd.to(p.dtype)
            logq = torch.log_softmax(_scaled(ref_logits, temperature), dim=-1)
            d = logp.sub_(logq)
            # p * (g_rev (d - KL(p||q)) + g_fwd - g_lp) - g_fwd q, built in place in d's buffer
            grad = d.sub_(_rowdot(p, d)[:, None]).mul_(g_rev[:, None]).add_((g_fwd - g_lp)[:, None]).mul_(p)
            grad.sub_(logq.exp_().mul_(g_fwd[:, None]))
        grad.scatter_add_(1, tokens[:, None], g_lp[:, None])
        if temperature != 1.0:
            grad.div_(temperature)
        return grad.to(logits.dtype), None, None, None


def _chunk_with_grad(head: Head, ref_head: Head | None, temperature: float, hidden: torch.Tensor,
                     ref_hidden: torch.Tensor | None, tokens: torch.Tensor):
    logits = head(hidden)  # (n, V), the policy's dtype
    ref_logits = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logits = ref_head(ref_hidden)
    return _LogProbKL.apply(logits, ref_logits, tokens, temperature)


def token_stats(hidden: torch.Tensor, tokens: torch.Tensor, head: Head, *, temperature: float = 1.0,
                chunk_size: int = 4096, ref_hidden: torch.Tensor | None = None, ref_head: Head | None = None,
                entropy: bool = False) -> dict[str, torch.Tensor]:
    """Per-token values of N tokens, `chunk_size` at a time; each (N,) in float32 (float64 for float64 logits).

    hidden: (N, H) final hidden states of the policy at the positions that predict `tokens` (N,).
    head: the policy's output layer (module or callable), logits = head(hidden) / temperature.
    ref_hidden, ref_head: the frozen reference's (N, H) hidden states and output layer; with them the
    result adds ref_logprobs, kl_reverse and kl_forward. entropy=True adds the policy's entropy (nats).
    Differentiable through `hidden` and the head's parameters when grad is enabled (logprobs, kl_reverse
    and kl_forward); the reference is treated as frozen. Entropy is a logged diagnostic: ask for it
    under torch.no_grad.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (ref_hidden is None) != (ref_head is None):
        raise ValueError("ref_hidden and ref_head go together: pass both or neither")
    if ref_hidden is not None and ref_hidden.shape != hidden.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} differ")
    grad = torch.is_grad_enabled()
    if grad and entropy:
        raise ValueError("entropy is a logged diagnostic: compute it under torch.no_grad()")
    keys = ["logprobs"] + (["entropy"] if entropy else []) + (
        ["ref_logprobs", "kl_reverse", "kl_forward"] if ref_hidden is not None else [])
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for start in range(0, hidden.shape[0], chunk_size):
        h, tok = hidden[start:start + chunk_size], tokens[start:start + chunk_size]
        ref_h = None if ref_hidden is None else ref_hidden[start:start + chunk_size]
        if grad:
            # Checkpointed: autograd keeps only the chunk's inputs, and recomputes its logits in backward.
            out = checkpoint(partial(_chunk_with_grad, head, ref_head, temperature), h, ref_h, tok,
                             use_reentrant=False)
            values = dict(zip(("logprobs", "kl_reverse", "kl_forward", "ref_logprobs"),
                              out if ref_h is not None else (out,)))
        else:
            values = _chunk_values(head(h), None if ref_h is None else ref_head(ref_h), tok, temperature, entropy)
        for key in keys:
            parts[key].append(values[key])
    empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return {k: torch.cat(v) if v else empty for k, v in parts.items()}


def masked_token_stats(hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, head: Head, *,
                       ref_hidden: torch.Tensor | None = None, min_tokens: int = 0,
                       **kwargs) -> dict[str, torch.Tensor]:
    """token_stats on the real tokens of a padded batch; values come back (B, T), 0 on padding.

    hidden, ref_hidden: (B, T, H); tokens, mask: (B, T). Only the mask's tokens are computed (padding
    costs nothing). min_tokens > N pads the packed tokens with zero rows up to min_tokens, so that
    several data-parallel ranks make the same number of head calls (under ZeRO-3 each call is a
    collective all-gather of the head's weight). Other keyword arguments go to token_stats.
    """
    packed, packed_tokens = hidden[mask], tokens[mask]  # (N, H), (N,)
    ref_packed = None if ref_hidden is None else ref_hidden[mask]
    n = packed.shape[0]
    if min_tokens > n:
        packed = torch.cat([packed, packed.new_zeros(min_tokens - n, packed.shape[1])])
        packed_tokens = torch.cat([packed_tokens, packed_tokens.new_zeros(min_tokens - n)])
        if ref_packed is not None:
            ref_packed = torch.cat([ref_packed, ref_packed.new_zeros(min_tokens - n, ref_packed.shape[1])])
    values = token_stats(packed, packed_tokens, head, ref_hidden=ref_packed, **kwargs)
    return {k: v.new_zeros(mask.shape).masked_scatter(mask, v[:n]) for k, v in values.items()}
