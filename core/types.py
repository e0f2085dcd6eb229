"""Typed batches that cross actor boundaries (rollout -> driver -> learner).

Layout: B rows = prompts_per_step * n_samples, rows of one prompt are contiguous (row b answers prompt
b // n). Prompts are left-padded and responses right-padded, so `cat([prompt_ids, response_ids], 1)` is
one causal sequence per row whose response starts at column P for every row.

The sampler's log-probs (vLLM) are kept apart from the learner's recomputed ones: their difference is
the off-policy gap a weight-sync bug would open, and klrl logs it (`rollout/logprob_gap`).

`Rollout` and `Learner` are the engines as the trial loop sees them (typing.Protocol): the Ray groups
in `workers/actors.py` implement them, and so do the unit tests' fakes, so the loop never sees Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from core.config import Config


def _pad_to(t: torch.Tensor, width: int, value: float | int | bool, left: bool) -> torch.Tensor:
    gap = width - t.shape[1]
    if gap == 0:
        return t
    pad = torch.full((t.shape[0], gap), value, dtype=t.dtype)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


class _Shardable:
    """`shard` for a batch class that has `batch_size` and `rows(slice)`: one definition for both batches."""

    def shard(self, rank: int, world_size: int):
        """Rank's contiguous 1/world_size of the rows; the batch must split evenly."""
        if self.batch_size % world_size:
            raise ValueError(f"batch of {self.batch_size} rows does not split over world_size={world_size}")
        per = self.batch_size // world_size
        return self.rows(slice(rank * per, (rank + 1) * per))


@dataclass
class RolloutBatch(_Shardable):
    """What the rollout workers return: prompts, sampled responses and the sampler's log-probs."""

    prompt_ids: torch.Tensor  # (B, P) long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: torch.Tensor  # (B, T) long, right-padded with pad_token_id
    response_mask: torch.Tensor  # (B, T) bool, True on generated tokens (EOS included)
    sampler_logprobs: torch.Tensor  # (B, T) float32, log pi_sampler(a_t | s_t) from vLLM; 0 on padding
    group_index: torch.Tensor  # (B,) long, index of the prompt each row answers (contiguous groups)
    finish_reasons: list[str]  # B items: 'stop' (EOS) or 'length' (hit max_new_tokens)
    prompt_texts: list[str]  # B items, the formatted prompt each row answers
    response_texts: list[str]  # B items, decoded responses without special tokens
    pad_token_id: int = 0

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:  # (B,) long
        return self.response_mask.sum(dim=1)

    def rows(self, index: torch.Tensor | list[int] | slice) -> "RolloutBatch":
        """A batch of the selected rows (tensors indexed, lists likewise)."""
        if isinstance(index, slice):
            index = list(range(self.batch_size))[index]
        index = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[index]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in index.tolist()]
            else:
                out[f.name] = value
        return RolloutBatch(**out)

    @staticmethod
    def concat(parts: list["RolloutBatch"]) -> "RolloutBatch":
        """Stack batches from several rollout workers, re-padding prompts (left) and responses (right)."""
        p_width = max(b.prompt_ids.shape[1] for b in parts)
        t_width = max(b.response_ids.shape[1] for b in parts)
        pad = parts[0].pad_token_id
        offset, groups = 0, []
        for b in parts:
            groups.append(b.group_index + offset)
            offset += int(b.group_index.max()) + 1 if b.batch_size else 0
        return RolloutBatch(
            prompt_ids=torch.cat([_pad_to(b.prompt_ids, p_width, pad, left=True) for b in parts]),
            prompt_mask=torch.cat([_pad_to(b.prompt_mask, p_width, False, left=True) for b in parts]),
            response_ids=torch.cat([_pad_to(b.response_ids, t_width, pad, left=False) for b in parts]),
            response_mask=torch.cat([_pad_to(b.response_mask, t_width, False, left=False) for b in parts]),
            sampler_logprobs=torch.cat([_pad_to(b.sampler_logprobs, t_width, 0.0, left=False) for b in parts]),
            group_index=torch.cat(groups),
            finish_reasons=[r for b in parts for r in b.finish_reasons],
            prompt_texts=[r for b in parts for r in b.prompt_texts],
            response_texts=[r for b in parts for r in b.response_texts],
            pad_token_id=pad,
        )


@dataclass
class TokenScores:
    """Per-token quantities the learner computes for a RolloutBatch before the update."""

    logprobs: torch.Tensor  # (B, T) float32, log pi_old(a_t) recomputed by the learner (behaviour policy)
    ref_logprobs: torch.Tensor  # (B, T) float32, log pi_ref(a_t)
    entropy: torch.Tensor  # (B, T) float32, H(pi_old(. | s_t)) in nats, full vocabulary
    exact_kl_reverse: torch.Tensor  # (B, T) float32, KL(pi_old || pi_ref) at s_t, full vocabulary, nats
    exact_kl_forward: torch.Tensor  # (B, T) float32, KL(pi_ref || pi_old) at s_t, full vocabulary, nats

    @staticmethod
    def concat(parts: list["TokenScores"]) -> "TokenScores":
        width = max(p.logprobs.shape[1] for p in parts)
        return TokenScores(**{
            f.name: torch.cat([_pad_to(getattr(p, f.name), width, 0.0, left=False) for p in parts])
            for f in fields(TokenScores)
        })

    def rows(self, index: torch.Tensor | slice) -> "TokenScores":
        return TokenScores(**{f.name: getattr(self, f.name)[index] for f in fields(TokenScores)})


@dataclass
class TrainBatch(_Shardable):
    """Everything one PPO update needs; advantages already include any in-reward KL penalty."""

    rollout: RolloutBatch
    old_logprobs: torch.Tensor  # (B, T) float32, log pi_old(a_t) (the learner's, not the sampler's)
    ref_logprobs: torch.Tensor  # (B, T) float32, log pi_ref(a_t)
    advantages: torch.Tensor  # (B, T) float32, per-token advantage, 0 on padding

    @property
    def batch_size(self) -> int:
        return self.rollout.batch_size

    def rows(self, index: torch.Tensor | list[int] | slice) -> "TrainBatch":
        if isinstance(index, slice):
            index = list(range(self.rollout.batch_size))[index]
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            rollout=self.rollout.rows(index),
            old_logprobs=self.old_logprobs[index],
            ref_logprobs=self.ref_logprobs[index],
            advantages=self.advantages[index],
        )


# ---- the engines, as the trial loop sees them --------------------------------------------------------

@runtime_checkable
class Rollout(Protocol):
    """Samples responses with the current policy (vLLM behind it)."""

    def generate(self, prompts: list[str], n: int, seed: int) -> RolloutBatch:
        """n samples per prompt, rows of a prompt contiguous; the same seed draws the same samples."""

    def reset(self, config: "Config") -> None:
        """Back to a fresh engine for this trial: its sampling settings and seeds, an empty prefix cache.
        The weights are the learner's to set (`Learner.sync_weights_to`)."""

    def shutdown(self) -> None:
        """Stop the engine and free its resources."""


@runtime_checkable
class Learner(Protocol):
    """Scores and trains the policy against its frozen reference (DeepSpeed behind it)."""

    def score(self, batch: RolloutBatch) -> TokenScores:
        """Per-token log-probs of the policy and the reference, entropy and exact KL, (B, T) each."""

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One PPO update; returns `section/name` metrics."""

    def sync_weights_to(self, rollout: Rollout) -> None:
        """Load the policy's current weights into the rollout engine, the way `rollout.weight_sync` says
        (through Ray's object store, or the trial's process group from the learner into the engines)."""

    def save_checkpoint(self, directory: str) -> None:
        """Weights, optimizer, step counters and RNG states under `directory`."""

    def load_checkpoint(self, directory: str) -> None:
        """Restore what save_checkpoint wrote."""

    def reset(self, config: "Config") -> None:
        """Back to pi_ref weights, a fresh optimizer and scheduler, step counters at 0 and this trial's
        seeds and call-time settings (lr, algorithm, ...), exactly as a freshly built learner."""

    def shutdown(self) -> None:
        """Stop the engine and free its resources."""
