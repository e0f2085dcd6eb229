"""Tensor plumbing between a RolloutBatch and a causal LM forward pass (no engine, no Ray).

A RolloutBatch row is `[left-padded prompt | right-padded response]`, so every response starts at
column P. The logits that predict response token t sit at column P - 1 + t, i.e. the last T + 1
columns minus the final one: `logits_to_keep=T + 1` lets the model skip the lm_head on the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.types import RolloutBatch


@dataclass
class ModelInputs:
    """One forward pass's inputs for a (micro-)batch of B rows, P prompt + T response columns."""

    input_ids: torch.Tensor  # (B, P + T) long
    attention_mask: torch.Tensor  # (B, P + T) long, 1 on real tokens
    position_ids: torch.Tensor  # (B, P + T) long, 0 at each row's first real token
    response_ids: torch.Tensor  # (B, T) long, the sampled tokens whose log-probs we score
    response_mask: torch.Tensor  # (B, T) bool

    def to(self, device: torch.device | str) -> "ModelInputs":
        return ModelInputs(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                     self.response_ids, self.response_mask)))


def model_inputs(batch: RolloutBatch) -> ModelInputs:
    """Concatenate prompt and response; positions count real tokens only, as vLLM numbers them."""
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1).long()
    # Left padding would otherwise shift every position by the pad count and change the log-probs
    # against vLLM, which never sees the padding.
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ModelInputs(input_ids, mask, position_ids, batch.response_ids, batch.response_mask.bool())


def response_logits(model: torch.nn.Module, inputs: ModelInputs, temperature: float = 1.0) -> torch.Tensor:
    """Float32 logits over the vocabulary at each response position: (B, T, V).

    Divided by the sampling temperature so log-probs are those of the distribution vLLM sampled from
    (verl and OpenRLHF do the same). Padding positions hold finite garbage; callers mask them.
    """
    T = inputs.response_ids.shape[1]
    out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids, logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, T, V): column j predicts response token j
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: (B, T, V), (B, T) -> (B, T) float32.

    logsumexp + gather instead of a full log_softmax keeps one (B, T, V) tensor fewer alive.
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def micro_batches(batch_size: int, micro_batch_size: int) -> list[slice]:
    """Contiguous row slices of at most micro_batch_size rows covering range(batch_size)."""
    return [slice(i, min(i + micro_batch_size, batch_size)) for i in range(0, batch_size, micro_batch_size)]


def trim_padding(batch: RolloutBatch) -> RolloutBatch:
    """Drop prompt columns that are padding in every row and response columns after the longest response.

    A micro-batch of short rows then costs only its own length. Prompts stay left-aligned to column P
    and responses start at P, so the layout contract still holds.
    """
    keep_p = batch.prompt_mask.any(dim=0).nonzero()
    keep_t = batch.response_mask.any(dim=0).nonzero()
    p0 = int(keep_p[0]) if len(keep_p) else batch.prompt_ids.shape[1]
    t1 = int(keep_t[-1]) + 1 if len(keep_t) else 1
    out = batch.rows(slice(None))
    out.prompt_ids, out.prompt_mask = batch.prompt_ids[:, p0:], batch.prompt_mask[:, p0:]
    out.response_ids, out.response_mask = batch.response_ids[:, :t1], batch.response_mask[:, :t1]
    out.sampler_logprobs = batch.sampler_logprobs[:, :t1]
    return out
