"""Tensor plumbing between a RolloutBatch and a causal LM forward pass (no engine, no Ray).

A RolloutBatch row is `[left-padded prompt | right-padded response]`, so every response starts at
column P. The hidden state that predicts response token t sits at column P - 1 + t; only those T
columns, and only at real tokens, reach the output layer (ResponseScorer, core.lm_head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.lm_head import masked_token_stats
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


class ResponseScorer(torch.nn.Module):
    """A Hugging Face causal LM whose forward returns per-token values of the response tokens, computed
    from the final hidden states in chunks (core.lm_head): no (B, T, V) logits tensor ever exists.

    The LM's children are registered under their own names, so `named_parameters()` and `state_dict()`
    are the LM's (weight export, DeepSpeed checkpoints and vLLM's loader see the usual HF names, and a
    tied embedding appears once). DeepSpeed wraps this module rather than the LM so that its hooks see
    what the loss is made of: the outputs of forward (gradient-accumulation prologue) and every call of
    the output layer (ZeRO-3 gathers its sharded weight around each chunk).
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.config = lm.config
        # Names, not second references: a module assigned twice would appear twice in state_dict().
        self._decoder_name = _child_name(lm, lm.base_model)
        self._head_name = _child_name(lm, lm.get_output_embeddings())

    @property
    def head(self) -> torch.nn.Module:
        """The output layer: (n, H) hidden -> (n, V) logits."""
        return getattr(self, self._head_name)

    def response_hidden(self, inputs: ModelInputs) -> torch.Tensor:
        """Final hidden states (after the last norm) at the positions predicting each response token: (B, T, H)."""
        T = inputs.response_ids.shape[1]
        P = inputs.input_ids.shape[1] - T
        out = getattr(self, self._decoder_name)(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                                position_ids=inputs.position_ids, use_cache=False)
        return out.last_hidden_state[:, P - 1:P + T - 1]  # column P - 1 + t predicts response token t

    def forward(self, inputs: ModelInputs, temperature: float, chunk_size: int,
                ref_hidden: torch.Tensor | None = None, ref_head: torch.nn.Module | None = None,
                entropy: bool = False, min_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Per-token values, each (B, T) float32, 0 on padding: logprobs, and entropy when asked; with the
        reference's (B, T, H) response hidden states and output layer also ref_logprobs, kl_reverse and
        kl_forward (core.lm_head.token_stats). Log-probs are those of logits / temperature, the
        distribution vLLM sampled from (verl and OpenRLHF do the same)."""
        return masked_token_stats(self.response_hidden(inputs), inputs.response_ids, inputs.response_mask,
                                  self.head, ref_hidden=ref_hidden, ref_head=ref_head, temperature=temperature,
                                  chunk_size=chunk_size, entropy=entropy, min_tokens=min_tokens)


def _child_name(parent: torch.nn.Module, child: torch.nn.Module | None) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise ValueError(f"{type(parent).__name__}: expected a decoder and an output layer among its direct "
                     "children (a Hugging Face *ForCausalLM model)")


def pack_micro_batches(prompt_lengths: list[int], response_lengths: list[int], max_rows: int,
                       max_tokens: int = 0, min_count: int = 1) -> list[list[int]]:
    """Row indices of each micro-batch; every row appears in exactly one.

    max_tokens == 0: contiguous runs of at most max_rows rows, in order. max_tokens > 0: rows taken
    longest first (prompt + response), each micro-batch closed before it would exceed max_rows rows or
    max_tokens padded tokens, i.e. rows x (longest prompt + longest response) once trim_padding has
    cut it to its own width; a row longer than max_tokens gets a micro-batch of its own. Then, while
    there are fewer than min_count micro-batches, the one with most rows is halved: data-parallel ranks
    must run the same number of forward/backward passes (each ZeRO-2/3 backward is a collective).
    min_count <= the number of rows.
    """
    n = len(prompt_lengths)
    if max_tokens <= 0:
        groups = [list(range(i, min(i + max_rows, n))) for i in range(0, n, max_rows)]
    else:
        order = sorted(range(n), key=lambda i: -(prompt_lengths[i] + response_lengths[i]))  # stable
        groups, p_max, t_max = [], 0, 0
        for i in order:
            p, t = max(p_max, prompt_lengths[i]), max(t_max, response_lengths[i])
            if groups and len(groups[-1]) < max_rows and (len(groups[-1]) + 1) * (p + t) <= max_tokens:
                groups[-1].append(i)
                p_max, t_max = p, t
            else:
                groups.append([i])
                p_max, t_max = prompt_lengths[i], response_lengths[i]
    if min_count > n:
        raise ValueError(f"cannot split {n} rows into {min_count} micro-batches")
    while len(groups) < min_count:
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        half = (len(groups[k]) + 1) // 2
        groups[k:k + 1] = [groups[k][:half], groups[k][half:]]
    return groups


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
