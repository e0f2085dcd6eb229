"""Chunked log-probs, entropy and exact KL from hidden states (core/lm_head.py) against the unchunked path.

The unchunked path is what a full-logits learner computes: logits = head(hidden).float() / temperature,
log-probs by logsumexp + gather, core.metrics.entropy_from_logits and core.kl.exact_token_kl on the whole
(N, V) tensors. Values and gradients (w.r.t. hidden states and the head's weight) must agree within 1e-6
in float32 for every chunk size, including 1 and larger than the number of tokens.
"""
from __future__ import annotations

import pytest
import torch

from core import kl, lm_head, losses
from core.config import AlgorithmConfig
from core.metrics import entropy_from_logits

N, H, V = 11, 8, 37
TOL = dict(atol=1e-6, rtol=1e-6)


def _setup(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    ref_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        ref_head.weight.copy_(head.weight + 0.5 * torch.randn(V, H, generator=g))
    hidden = torch.randn(n, H, generator=g)
    ref_hidden = hidden + 0.3 * torch.randn(n, H, generator=g)
    tokens = torch.randint(0, V, (n,), generator=g)
    weights = torch.randn(3, n, generator=g)  # a random linear loss over the three outputs
    return head, ref_head, hidden, ref_hidden, tokens, weights


def _unchunked(hidden, tokens, head, ref_hidden, ref_head, temperature):
    logits = head(hidden).float() / temperature  # (N, V): what the chunked path never builds
    ref_logits = ref_head(ref_hidden).float() / temperature
    logprobs = logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, -1)
    ref_logprobs = ref_logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(ref_logits, -1)
    reverse, forward = kl.exact_token_kl(logits, ref_logits, chunk_size=10**6)
    with torch.no_grad():
        entropy = entropy_from_logits(logits, chunk_size=10**6)
    return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "kl_reverse": reverse, "kl_forward": forward,
            "entropy": entropy}


def _loss(values, weights):
    """A token-mean loss (as the learner's), so gradients are O(1) and 1e-6 is a few float32 ulps."""
    return (weights[0] * values["logprobs"] + weights[1] * values["kl_reverse"]
            + weights[2] * values["kl_forward"]).mean()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 4, N, N + 5])
def test_values_and_gradients_equal_the_unchunked_path(chunk_size, temperature):
    head, ref_head, hidden, ref_hidden, tokens, weights = _setup()
    h_full = hidden.clone().requires_grad_(True)
    full = _unchunked(h_full, tokens, head, ref_hidden, ref_head, temperature)
    _loss(full, weights).backward()
    w_grad_full = head.weight.grad.clone()
    head.zero_grad()
    h = hidden.clone().requires_grad_(True)
    chunked = lm_head.token_stats(h, tokens, head, temperature=temperature, chunk_size=chunk_size,
                                  ref_hidden=ref_hidden, ref_head=ref_head)
    _loss(chunked, weights).backward()
    for key in ("logprobs", "ref_logprobs", "kl_reverse", "kl_forward"):
        assert chunked[key].dtype == torch.float32 and chunked[key].shape == (N,)
        assert torch.allclose(chunked[key], full[key], **TOL), key
    assert torch.allclose(h.grad, h_full.grad, **TOL)
    assert torch.allclose(head.weight.grad, w_grad_full, **TOL)
    assert h.grad.abs().max() > 0.1  # the gradients compared are not trivially small
    with torch.no_grad():
        logged = lm_head.token_stats(hidden, tokens, head, temperature=temperature, chunk_size=chunk_size,
                                     ref_hidden=ref_hidden, ref_head=ref_head, entropy=True)
    for key in full:
        assert torch.allclose(logged[key], full[key].detach(), **TOL), key


def test_logprob_gradient_alone_needs_no_reference():
    """The k1/k3 arms only differentiate log-probs: no reference enters the update's head."""
    head, _, hidden, _, tokens, weights = _setup(1)
    h_full = hidden.clone().requires_grad_(True)
    logits = head(h_full) / 1.3
    (weights[0] * (logits.gather(-1, tokens[:, None])[:, 0] - logits.logsumexp(-1))).sum().backward()
    expected_w = head.weight.grad.clone()
    head.zero_grad()
    h = hidden.clone().requires_grad_(True)
    values = lm_head.token_stats(h, tokens, head, temperature=1.3, chunk_size=3)
    assert set(values) == {"logprobs"}
    (weights[0] * values["logprobs"]).sum().backward()
    assert torch.allclose(h.grad, h_full.grad, **TOL) and torch.allclose(head.weight.grad, expected_w, **TOL)


def test_padded_rows_cost_nothing_and_get_no_gradient():
    g = torch.Generator().manual_seed(2)
    head, ref_head, *_ = _setup(2)
    B, T = 3, 5
    hidden = torch.randn(B, T, H, generator=g)
    ref_hidden = torch.randn(B, T, H, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([5, 2, 0])[:, None]  # a full, a short and an empty row
    full = _unchunked(hidden.reshape(-1, H), tokens.reshape(-1), head, ref_hidden.reshape(-1, H), ref_head, 0.9)
    h = hidden.clone().requires_grad_(True)
    for min_tokens in (0, 12):  # 12 > the 7 real tokens: zero rows padded on, then dropped
        h.grad = None
        values = lm_head.masked_token_stats(h, tokens, mask, head, ref_hidden=ref_hidden, ref_head=ref_head,
                                            temperature=0.9, chunk_size=2, min_tokens=min_tokens)
        (values["logprobs"].sum() + values["kl_forward"].sum()).backward()
        for key in ("logprobs", "ref_logprobs", "kl_reverse", "kl_forward"):
            assert values[key].shape == (B, T) and (values[key][~mask] == 0).all()
            assert torch.allclose(values[key][mask], full[key].reshape(B, T)[mask], **TOL), key
        assert (h.grad[~mask] == 0).all() and (h.grad[mask].abs().sum(-1) > 0).all()


def test_tied_embedding_gets_the_gradient_of_both_uses():
    """A tied input/output embedding (one parameter) accumulates both gradients, as in the full path."""
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(V, H)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight = emb.weight  # tied, as transformers ties them
    ids = torch.randint(0, V, (N,), generator=g)
    tokens = torch.randint(0, V, (N,), generator=g)
    grads = []
    for chunked in (False, True):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))  # (N, H)
        if chunked:
            logprobs = lm_head.token_stats(hidden, tokens, head, chunk_size=4)["logprobs"]
        else:
            logits = head(hidden)
            logprobs = logits.gather(-1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
        logprobs.sum().backward()
        grads.append(emb.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], **TOL)
    assert grads[0][ids].abs().sum() > 0 and grads[0][tokens].abs().sum() > 0


def test_exact_kl_gradient_identities_hold_through_the_chunked_loss():
    """With an identity head the hidden states are the logits: the in-loss exact KL's gradient is the
    closed form, d KL(q||p)/dz = p - q and d KL(p||q)/dz = p (d - sum p d), token-mean over 6 tokens."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 6, (2, 3), generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    p, q = torch.softmax(logits, -1), torch.softmax(ref_logits, -1)
    d = p.log() - q.log()
    expected = {"exact_forward": p - q, "exact_reverse": p * (d - (p * d).sum(-1, keepdim=True))}
    for estimator, grad_expected in expected.items():
        z = logits.clone().requires_grad_(True)
        values = lm_head.masked_token_stats(z, tokens, mask, torch.nn.Identity(), ref_hidden=ref_logits,
                                            ref_head=torch.nn.Identity(), chunk_size=4)
        algo = AlgorithmConfig(kl_mode="in_loss", kl_estimator=estimator, kl_coef=1.0)
        loss, _ = losses.policy_loss(values["logprobs"], values["logprobs"].detach(), values["logprobs"].detach(),
                                     torch.zeros(2, 3), mask, algo,
                                     exact_kl=(values["kl_reverse"], values["kl_forward"]))
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.allclose(grad, grad_expected / 6, atol=1e-10), estimator


def test_closed_form_backward_against_finite_differences():
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(4, 5, bias=False).double()
    ref_head = torch.nn.Linear(4, 5, bias=False).double().requires_grad_(False)
    ref_hidden = torch.randn(3, 4, generator=g, dtype=torch.float64)
    tokens = torch.tensor([0, 4, 2])

    def outputs(h):
        v = lm_head.token_stats(h, tokens, head, temperature=0.8, chunk_size=2, ref_hidden=ref_hidden,
                                ref_head=ref_head)
        return v["logprobs"], v["kl_reverse"], v["kl_forward"]
    h = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(outputs, (h,))


def test_no_vocabulary_sized_tensor_is_saved_for_backward():
    """Autograd keeps no (chunk, V) tensor: the chunks' logits are recomputed, not saved."""
    head, ref_head, hidden, ref_hidden, tokens, _ = _setup(6, n=40)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t
    h = hidden.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        values = lm_head.token_stats(h, tokens, head, chunk_size=8, ref_hidden=ref_hidden, ref_head=ref_head)
        (values["logprobs"].sum() + values["kl_reverse"].sum()).backward()
    assert max(saved, default=0) < 8 * V and h.grad is not None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # control: the full path saves (N, V)
        _unchunked(hidden.clone().requires_grad_(True), tokens, head, ref_hidden, ref_head, 1.0)
    assert max(saved) >= 40 * V


def test_bad_input():
    head, ref_head, hidden, ref_hidden, tokens, _ = _setup()
    with pytest.raises(ValueError, match="chunk_size"):
        lm_head.token_stats(hidden, tokens, head, chunk_size=0)
    with pytest.raises(ValueError, match="go together"):
        lm_head.token_stats(hidden, tokens, head, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="differ"):
        lm_head.token_stats(hidden, tokens, head, ref_hidden=ref_hidden[:3], ref_head=ref_head)
    with pytest.raises(ValueError, match="no_grad"):
        lm_head.token_stats(hidden, tokens, head, entropy=True)
    with torch.no_grad():
        empty = lm_head.token_stats(hidden[:0], tokens[:0], head, entropy=True)
    assert empty["logprobs"].shape == empty["entropy"].shape == (0,)
