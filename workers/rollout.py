"""The rollout worker: a vLLM engine that samples n responses per prompt and returns a RolloutBatch.

A plain class (no Ray here; `workers/actors.py` wraps it). What it adds on top of `vllm.LLM.generate`
is deliberately small, because it sits on the hot path of every RL step and `benchmarks/rollout.py`
measures it against raw vLLM:
  - seeded sampling: one request per prompt with `n` children; vLLM seeds child j with `seed_i + j`, and
    the per-prompt `seed_i` are drawn from `numpy.random.default_rng(seed)`, so a rerun with the same seed
    draws the same completions while nearby seeds (step k vs k+1) share no sample streams;
  - the sampled tokens' log-probs (`logprobs=0` returns only the sampled token's), read from vLLM's
    `FlatLogprobs` lists without building per-token dicts;
  - `detokenize=False`, with the texts decoded once at the end by one `batch_decode`: with log-probs
    requested, vLLM otherwise detokenizes every log-prob token in Python (and re-decodes context for
    byte tokens), which cost ~30% of the tiny policy's rollout CPU time (see benchmarks/rollout.py).
    klrl stops on EOS only, so no stop strings need vLLM's incremental detokenizer;
  - padded tensors built with one preallocated tensor per field and one masked scatter each.
Weights are pushed in place with `collective_rpc("reload_weights")`: on CPU vLLM repacks linear weights
at load time, so `model.load_weights` on the running model does not work, while reload_weights redoes
the repacking. Two ways in (`rollout.weight_sync`): `update_weights` takes the whole list (object-store
path); `open_weight_sync` / `receive_weights` join the trial's process group and load the learner's
broadcast through the worker extension `workers/vllm_extension.py`, which every engine carries (so the
setting is read at call time and an engine serves trials of either kind).
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch

from core.config import Config, RolloutConfig, flatten
from core.types import RolloutBatch
from tasks.policy import check_model_folder
from workers import device

# Log-probs of the distribution the tokens were actually drawn from (after temperature/top-p), so the
# learner's recomputed log-probs differ from them only by what a stale or wrong weight sync would cause.
# With temperature=1 and top_p=1 (klrl's on-policy default) this equals the raw policy log-probs.
LOGPROBS_MODE = "processed_logprobs"
# Rollout settings read at call time; every other model/rollout field is built into the engine, so an
# engine is reused only for a trial that agrees on all of those (`built_settings`).
RESET_FIELDS = ("rollout.n_samples", "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens",
                "rollout.weight_sync")
WORKER_EXTENSION = "workers.vllm_extension.WeightSyncExtension"  # vLLM's worker_extension_cls


def built_settings(config: Config) -> dict:
    """The settings a RolloutWorker bakes in at construction (dotted name -> value)."""
    flat = flatten({"model": config.to_dict()["model"], "rollout": config.to_dict()["rollout"]})
    return {k: v for k, v in flat.items() if k not in RESET_FIELDS}


def _seed_engine_worker(worker, seed: int) -> None:
    """Run in every vLLM worker (collective_rpc): the global RNGs a fresh engine of `seed` starts from."""
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(seed)


class RolloutWorker:
    """A vLLM engine over one model folder.

    Args:
        model_path: a Hugging Face causal-LM folder (config.json, weights, tokenizer).
        rollout: sampling defaults and engine resources (`RolloutConfig`).
        dtype: 'float32' or 'bfloat16' (vLLM's dtype).
        seed: engine seed, and the seed of sampling when `generate` gets no seed.
        worker_extension_cls: qualified name of the class vLLM mixes into its workers (the receiving
            end of the collective weight sync).
    """

    def __init__(self, model_path: str | os.PathLike, rollout: RolloutConfig, dtype: str = "float32",
                 seed: int = 0, worker_extension_cls: str = WORKER_EXTENSION):
        # vLLM would otherwise try the hub and fail with an error that hides the local path.
        path = check_model_folder(model_path, "model_path", tokenizer=False)
        check_model_len(path, rollout)  # the driver could not, if the model was not on its machine
        self.rollout = rollout
        self._rng = np.random.default_rng(seed)
        # The device is the one this actor was given (workers/device.py), never the driver's.
        actor = device.this_actor()
        actor.enter()
        actor.check(dtype)
        device_args, device_env = actor.vllm_settings(rollout)
        os.environ.update(device_env)
        engine_args: dict = dict(model=str(path), dtype=dtype, max_model_len=rollout.max_model_len, seed=seed,
                                 logprobs_mode=LOGPROBS_MODE, worker_extension_cls=worker_extension_cls,
                                 **device_args)
        from vllm import LLM  # imported late: it is heavy and reads the environment set above

        self.llm = LLM(**engine_args)
        self.tokenizer = tokenizer = self.llm.get_tokenizer()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    def generate(self, prompts: list[str], n: int, seed: int | None = None, temperature: float | None = None,
                 max_new_tokens: int | None = None, ignore_eos: bool = False) -> RolloutBatch:
        """Sample `n` responses to each prompt; B = len(prompts) * n rows, prompt i's rows contiguous.

        `temperature`/`max_new_tokens` default to the RolloutConfig's. `seed=None` draws a fresh seed
        from the worker's own generator (reproducible across runs of the same call sequence).
        `ignore_eos=True` always generates exactly `max_new_tokens` tokens (benchmarks only).
        """
        if not prompts or n < 1:
            raise ValueError(f"generate needs at least one prompt and n >= 1, got {len(prompts)} prompts, n={n}")
        params = self.sampling_params(len(prompts), n, seed, temperature, max_new_tokens, ignore_eos)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        longest = max(len(o.prompt_token_ids) for o in outputs)
        if longest + params[0].max_tokens > self.rollout.max_model_len:  # vLLM silently cut responses short
            raise ValueError(f"rollout.max_model_len: a prompt of {longest} tokens plus rollout.max_new_tokens "
                             f"({params[0].max_tokens}) exceeds rollout.max_model_len ({self.rollout.max_model_len})")
        return self.to_batch(prompts, outputs, n)

    def sampling_params(self, n_prompts: int, n: int, seed: int | None = None, temperature: float | None = None,
                        max_new_tokens: int | None = None, ignore_eos: bool = False) -> list:
        """One vLLM SamplingParams per prompt (n children each, child j seeded seed_i + j by vLLM)."""
        from vllm import SamplingParams

        rng = self._rng if seed is None else np.random.default_rng(seed)
        prompt_seeds = rng.integers(0, 2**31 - n, size=n_prompts).tolist()
        max_tokens = self.rollout.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = self.rollout.temperature if temperature is None else temperature
        return [SamplingParams(n=n, seed=s, temperature=temperature, top_p=self.rollout.top_p,
                               max_tokens=max_tokens, logprobs=0, flat_logprobs=True, detokenize=False,
                               ignore_eos=ignore_eos, min_tokens=max_tokens if ignore_eos else 0)
                for s in prompt_seeds]

    def to_batch(self, prompts: list[str], outputs: list, n: int) -> RolloutBatch:
        """vLLM RequestOutputs (one per prompt, n completions each) -> padded RolloutBatch tensors."""
        completions = [c for out in outputs for c in out.outputs]  # B, in prompt-major order
        n_prompts, batch = len(outputs), len(completions)
        pad = self.pad_token_id

        # Prompts: (N, P) left-padded once per prompt, then repeated n times (rows of a group are equal).
        prompt_lens = torch.tensor([len(o.prompt_token_ids) for o in outputs])  # (N,)
        width = int(prompt_lens.max())
        prompt_mask = torch.arange(width) >= (width - prompt_lens)[:, None]  # (N, P)
        prompt_ids = torch.full((n_prompts, width), pad, dtype=torch.long)
        # Boolean-mask assignment fills row-major, so the flat concatenation lands left-padded.
        prompt_ids[prompt_mask] = torch.tensor(list(itertools.chain.from_iterable(
            o.prompt_token_ids for o in outputs)), dtype=torch.long)

        # Responses: (B, T) right-padded; token ids and log-probs scattered in one masked write each.
        lens = torch.tensor([len(c.token_ids) for c in completions])  # (B,)
        t_width = max(int(lens.max()), 1)
        response_mask = torch.arange(t_width) < lens[:, None]  # (B, T)
        response_ids = torch.full((batch, t_width), pad, dtype=torch.long)
        response_ids[response_mask] = torch.tensor(list(itertools.chain.from_iterable(
            c.token_ids for c in completions)), dtype=torch.long)
        logprobs = torch.zeros((batch, t_width), dtype=torch.float32)
        # FlatLogprobs keeps one float per position when logprobs=0 (only the sampled token's).
        logprobs[response_mask] = torch.tensor(list(itertools.chain.from_iterable(
            c.logprobs.logprobs for c in completions)), dtype=torch.float32)

        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            response_ids=response_ids,
            response_mask=response_mask,
            sampler_logprobs=logprobs,
            group_index=torch.arange(n_prompts).repeat_interleave(n),
            finish_reasons=[c.finish_reason for c in completions],
            prompt_texts=[p for p in prompts for _ in range(n)],
            response_texts=self.tokenizer.batch_decode([c.token_ids for c in completions],
                                                       skip_special_tokens=True),
            pad_token_id=pad,
        )

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (Hugging Face parameter names) into the running engine, without a restart.

        reload_weights maps HF names onto vLLM's fused layers (qkv, gate_up) and redoes the CPU weight
        repacking; the prefix cache is then dropped because its KV entries were computed by old weights.
        """
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        self.llm.reset_prefix_cache()

    def reset(self, rollout: RolloutConfig, seed: int) -> None:
        """Become the engine a fresh build would be for a new trial: its sampling settings (call-time
        fields only: the caller keeps the built ones equal), its seed, and no cached prefixes. The
        weights are the learner's to push (a fresh engine starts at pi_ref, so must this one)."""
        self.rollout = rollout
        self._rng = np.random.default_rng(seed)
        self.llm.collective_rpc(_seed_engine_worker, args=(seed,))
        self.llm.reset_prefix_cache()

    # ------------------------------------------------- collective weight sync (workers/weight_sync.py)
    def weight_sync_devices(self) -> list[str]:
        """Device type ('cpu'/'cuda') of each of the engine's workers: one group rank per worker."""
        return self.llm.collective_rpc("klrl_device_type")

    def open_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                         metas: list, bucket_bytes: int, timeout_s: float) -> list[int]:
        """Join the trial's weight-sync group (blocks until every member has joined); returns the ranks."""
        return self.llm.collective_rpc("klrl_open_weight_sync", kwargs={
            "host": host, "port": port, "rank_offset": rank_offset, "world_size": world_size, "backend": backend,
            "metas": metas, "bucket_bytes": bucket_bytes, "timeout_s": timeout_s})

    def receive_weights(self) -> int:
        """Load the learner's next broadcast; returns the bytes worker 0 received. The prefix cache is
        dropped as in update_weights."""
        received = self.llm.collective_rpc("klrl_receive_weights")
        self.llm.reset_prefix_cache()
        return int(received[0])

    def close_weight_sync(self) -> None:
        self.llm.collective_rpc("klrl_close_weight_sync")


def check_model_len(path: Path, rollout: RolloutConfig) -> None:
    """rollout.max_model_len within the model's max_position_embeddings (vLLM's own error names neither)."""
    limit = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    if isinstance(limit, int) and rollout.max_model_len > limit:
        raise ValueError(f"rollout.max_model_len: {rollout.max_model_len} exceeds the model's "
                         f"max_position_embeddings {limit} ({path / 'config.json'})")
