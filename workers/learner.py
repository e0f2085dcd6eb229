"""The learner: a DeepSpeed policy engine plus the frozen reference policy, as a plain class.

Ray wraps it in `workers/actors.py`; tests and benchmarks use it directly. One rank of a data-parallel
group: the driver (LearnerGroup) hands each rank its shard, DeepSpeed averages gradients across ranks.

Choices (see docs/DESIGN.md and docs/bench_learner.md):
- **Optimizer: torch.optim.AdamW**, handed to DeepSpeed as a client optimizer. DeepSpeed's CPU Adam is
  faster per step but JIT-compiles a C++ op (~40 s per fresh machine, needs a compiler) and exists for
  ZeRO-Offload; on GPU FusedAdam needs the same build. torch's AdamW works on every device, under every
  ZeRO stage (DeepSpeed wraps it for 1-3) and compiles nothing.
- **The reference lives in the learner, whole (never sharded), in the policy's dtype.** Exact
  full-vocabulary KL needs the reference's logits at every token: shipping (B, T, V) logits from a
  separate actor is 4 * 151936 bytes per token (~600 kB) against a one-off second copy of the weights.
  Under ZeRO-3 the policy is sharded but the reference is kept whole: it is read-only and has no
  optimizer state, so ZeRO-3's saving on it would be the weights alone (3 GB bf16 for a 1.5B model)
  while sharding it would add an all-gather to every reference forward.
- **Loss normalisation is global over the mini-batch.** `policy_loss` aggregates one micro-batch
  (a mean over its tokens, or over its sequences for the seq-mean-* modes). Each micro-batch's loss is
  re-weighted by (its units / units in the whole mini-batch on all ranks), units being tokens for
  token-mean and sequences otherwise, so that the sum over micro-batches and ranks equals the
  aggregation over the whole mini-batch: a long response weighs the same whichever micro-batch or rank
  holds it. A plain mean of micro-batch means (DeepSpeed's default loss/gas) would over-weight tokens
  in short micro-batches.
- **No (B, T, V) logits.** DeepSpeed wraps `workers.sequence.ResponseScorer`, whose forward returns
  per-token log-probs (and, in score or the exact-KL arm, pi_ref's log-probs and both exact KLs) computed
  from the final hidden states `kl_chunk_size` tokens at a time (core/lm_head.py); the reference's hidden
  states enter the same chunks, so its logits never outlive one either.
- **Memory knobs:** `learner.gradient_checkpointing` (HF, per decoder layer) and
  `learner.max_tokens_per_micro_batch` (rows packed longest first into micro-batches of bounded rows x
  padded length; all ranks run the same number of them). docs/BENCHMARKS.md measures them, `klrl plan`
  (orchestrator/plan.py) models them.
"""
from __future__ import annotations

import json
import os
import random
import socket
from collections import defaultdict
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from core.config import Config, flatten
from core.losses import policy_loss
from core.types import RolloutBatch, TokenScores, TrainBatch
from tasks.policy import check_model_folder
from workers import device
from workers.sequence import ModelInputs, ResponseScorer, model_inputs, pack_micro_batches, trim_padding
from workers.weight_transfer import TensorMeta, WeightSender, plan_buckets, tensor_meta

CHECKPOINT_TAG = "klrl"
DIST_TIMEOUT = timedelta(minutes=10)
SUMMED_METRICS = ("learner/tokens", "learner/sequences")  # LearnerGroup sums these over ranks
# Learner settings read at call time or applied by `reset`; every other model/learner field is built into
# the engine, so a learner is reused only for a trial that agrees on all of those (`built_settings`).
RESET_FIELDS = ("learner.lr", "learner.weight_decay", "learner.ppo_epochs", "learner.mini_batches",
                "learner.kl_chunk_size", "learner.max_tokens_per_micro_batch")


def built_settings(config: Config) -> dict:
    """The settings a LearnerWorker bakes in at construction (dotted name -> value)."""
    flat = flatten({"model": config.to_dict()["model"], "learner": config.to_dict()["learner"]})
    return {k: v for k, v in flat.items() if k not in RESET_FIELDS}


SCORE_KEYS = ("logprobs", "ref_logprobs", "entropy", "kl_reverse", "kl_forward")  # TokenScores' field order


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_same_vocab(policy: Path, reference: Path) -> None:
    """KL between two models is only defined over one shared vocabulary (read from their config.json, so
    the driver can refuse a mismatch before any rank starts and waits in the rendezvous)."""
    vocab = {name: json.loads((folder / "config.json").read_text()).get("vocab_size")
             for name, folder in (("policy", policy), ("reference", reference))}
    if vocab["policy"] != vocab["reference"]:
        raise ValueError(f"reference_path: vocabulary mismatch, policy '{policy}' has vocab_size "
                         f"{vocab['policy']} but reference '{reference}' has {vocab['reference']}; the "
                         "reference must share the policy's tokenizer")


def init_distributed(backend: str, rank: int, world_size: int, master_addr: str | None,
                     master_port: int | None) -> None:
    """Join (or create) the torch.distributed group DeepSpeed uses; a no-op if this process already has one."""
    import deepspeed

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != world_size:
            raise RuntimeError(f"torch.distributed already initialised with world_size="
                               f"{torch.distributed.get_world_size()}, asked for {world_size}")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, dist_init_required=False)
        return
    if master_addr is None or master_port is None:
        if world_size > 1:
            raise ValueError(f"master_addr and master_port are required for world_size={world_size}")
        master_addr, master_port = "127.0.0.1", free_port()
    # DeepSpeed and torch read these; LOCAL_RANK is 0 because each Ray actor sees only its own device.
    os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"})
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=DIST_TIMEOUT,
                               init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size)


def deepspeed_config(config: Config, world_size: int) -> dict:
    """DeepSpeed's JSON config from klrl's LearnerConfig; gradient accumulation is set per update."""
    lc = config.learner
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": lc.micro_batch_size * world_size,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        "bf16": {"enabled": config.model.dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # all devices
    np.random.seed(seed)
    random.seed(seed)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LearnerWorker:
    """One data-parallel rank: DeepSpeed policy engine + frozen whole reference model."""

    def __init__(self, model_path: str | os.PathLike, config: Config, rank: int = 0, world_size: int = 1,
                 master_addr: str | None = None, master_port: int | None = None,
                 reference_path: str | os.PathLike | None = None):
        # The device is the one this actor was given (workers/device.py), checked and set before
        # DeepSpeed picks its accelerator.
        actor = device.this_actor()
        actor.enter()
        actor.check(config.model.dtype)
        backend = actor.dist_backend(config.learner.backend)
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.config, self.rank, self.world_size = config, rank, world_size
        policy_path = check_model_folder(model_path, "model_path", tokenizer=False)
        ref_path = check_model_folder(reference_path or model_path, "reference_path", tokenizer=False)
        check_same_vocab(policy_path, ref_path)
        self.device = actor.torch_device()
        init_distributed(backend, rank, world_size, master_addr, master_port)
        torch.manual_seed(config.run.seed)
        dtype = getattr(torch, config.model.dtype)
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
        reference = AutoModelForCausalLM.from_pretrained(ref_path, dtype=dtype)
        if config.learner.gradient_checkpointing:
            # Non-reentrant: composes with the chunked head's own checkpoints and with ZeRO-3's hooks.
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = ResponseScorer(reference).to(self.device).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learner.lr,
                                      weight_decay=config.learner.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=ResponseScorer(policy), optimizer=optimizer, config=deepspeed_config(config, world_size),
            dist_init_required=False)
        self.steps = 0  # optimizer steps taken (saved in checkpoints)
        self.fresh: Path | None = None  # the snapshot `reset` returns to (see `snapshot`)
        _seed_everything(config.run.seed)  # the state `reset` re-creates, whatever the build drew

    # ----------------------------------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> TokenScores:
        """Per-token log pi_old, log pi_ref, entropy and exact KL (both directions) for this rank's rows.

        All (B, T) float32 in the batch's row order, zero on padding. KL is measured whatever the
        kl_mode, as a diagnostic.
        """
        self.engine.eval()
        B, T = batch.response_ids.shape
        out = torch.zeros(len(SCORE_KEYS), B, T)
        for rows in self._micro_batches(batch):
            inputs = model_inputs(trim_padding(batch.rows(rows))).to(self.device)
            values = self._token_values(inputs, reference=True, entropy=True)  # each (b, t)
            t = inputs.response_ids.shape[1]
            for i, key in enumerate(SCORE_KEYS):
                out[i, rows, :t] = values[key].float().cpu()
        return TokenScores(*out)

    def _token_values(self, inputs: ModelInputs, reference: bool, entropy: bool = False) -> dict[str, torch.Tensor]:
        """The policy's per-token values of one micro-batch (ResponseScorer.forward through the engine).

        reference=True adds pi_ref's log-probs and the exact KLs: the reference's hidden states go into
        the policy's chunks, so its logits exist only one chunk at a time, beside the policy's.
        """
        ref_hidden = None
        if reference:
            with torch.no_grad():
                ref_hidden = self.reference.response_hidden(inputs)  # (b, t, H)
        min_tokens = 0
        if self.config.learner.zero_stage == 3 and self.world_size > 1:
            # Every output-layer call all-gathers its ZeRO-3 shards: ranks must make the same number.
            min_tokens = int(self._global_reduce(float(inputs.response_mask.sum()), torch.distributed.ReduceOp.MAX))
        return self.engine(inputs, self.config.rollout.temperature, self.config.learner.kl_chunk_size,
                           ref_hidden=ref_hidden, ref_head=self.reference.head if reference else None,
                           entropy=entropy, min_tokens=min_tokens)

    def _micro_batches(self, batch: RolloutBatch) -> list[list[int]]:
        """Row indices per micro-batch (workers.sequence.pack_micro_batches); with a token budget, the
        same number of micro-batches on every rank (ZeRO-2/3 reduce gradients at every backward)."""
        lc = self.config.learner
        lengths = batch.prompt_mask.sum(1).tolist(), batch.response_mask.sum(1).tolist()
        groups = pack_micro_batches(*lengths, lc.micro_batch_size, lc.max_tokens_per_micro_batch)
        if lc.max_tokens_per_micro_batch and self.world_size > 1:
            count = int(self._global_reduce(float(len(groups)), torch.distributed.ReduceOp.MAX))
            groups = pack_micro_batches(*lengths, lc.micro_batch_size, lc.max_tokens_per_micro_batch, count)
        return groups

    # ---------------------------------------------------------------------------------------- update
    def update(self, batch: TrainBatch) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps on this rank's shard; returns metrics averaged over
        steps ('learner/tokens' and 'learner/sequences' are summed: response tokens and rows processed,
        epochs included). Mini-batches are contiguous row ranges of the shard, not shuffled, so rows of
        a prompt's group stay together. With mini_batches=1 a data-parallel update equals the
        single-process update on the concatenated batch up to float summation order; with more, a
        global mini-batch is the union of the ranks' m-th slices.
        """
        lc = self.config.learner
        n = batch.rollout.batch_size
        if n % lc.mini_batches:
            raise ValueError(f"learner.mini_batches: {lc.mini_batches} does not divide this rank's {n} rows")
        per_mini = n // lc.mini_batches
        self.engine.train()
        totals: dict[str, float] = defaultdict(float)
        n_steps = 0
        for _ in range(lc.ppo_epochs):
            for m in range(lc.mini_batches):
                mini = batch.rows(slice(m * per_mini, (m + 1) * per_mini))
                for key, value in self._mini_batch_step(mini).items():
                    totals[key] += value
                n_steps += 1
        metrics = {k: (v if k in SUMMED_METRICS else v / n_steps) for k, v in totals.items()}
        metrics["learner/optimizer_steps"] = float(self.steps)
        return metrics

    def _units(self, batch: TrainBatch) -> float:
        """What the loss aggregation averages over: tokens (token-mean) or sequences (seq-mean-*)."""
        if self.config.algorithm.loss_agg == "token-mean":
            return float(batch.rollout.response_mask.sum())
        return float(batch.rollout.batch_size)

    def _global_reduce(self, value: float, op=None) -> float:
        """value reduced over the data-parallel ranks (a sum unless op says otherwise)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
        return float(t.item())

    def _mini_batch_step(self, mini: TrainBatch) -> dict[str, float]:
        """One optimizer step: forward/backward per micro-batch, loss weighted by its share of units."""
        algo = self.config.algorithm
        parts = [mini.rows(rows) for rows in self._micro_batches(mini.rollout)]
        # The number of micro-batches varies with the rows' lengths, so DeepSpeed's own boundary rule
        # (micro-step counter % gas) would drift across mini-batches: the boundary is set explicitly
        # below, and gas kept in step for DeepSpeed's bookkeeping (train_batch_size = micro * gas * world).
        self.engine.set_train_batch_size(self.engine.train_micro_batch_size_per_gpu() * len(parts) * self.world_size)
        units = [self._units(p) for p in parts]
        local_units, global_units = sum(units), self._global_reduce(sum(units))
        exact = algo.kl_mode == "in_loss" and algo.kl_estimator.startswith("exact_")
        out: dict[str, float] = defaultdict(float)
        for part, u in zip(parts, units):
            self.engine.set_gradient_accumulation_boundary(part is parts[-1])  # reduce and step after the last
            trimmed = trim_padding(part.rollout)
            t = trimmed.response_ids.shape[1]
            inputs = model_inputs(trimmed).to(self.device)
            values = self._token_values(inputs, reference=exact)  # each (b, t), with gradient
            exact_kl = (values["kl_reverse"], values["kl_forward"]) if exact else None
            loss, loss_metrics = policy_loss(
                values["logprobs"], part.old_logprobs[:, :t].to(self.device),
                part.ref_logprobs[:, :t].to(self.device), part.advantages[:, :t].to(self.device),
                inputs.response_mask, algo, exact_kl=exact_kl)
            # DeepSpeed averages gradients over ranks (/ world_size); undo that so the sum over ranks
            # and micro-batches is the aggregation over the whole mini-batch (module docstring).
            self.engine.backward(loss * (u / global_units) * self.world_size, scale_wrt_gas=False)
            if part is parts[-1]:
                plain_norm = self._plain_grad_norm()
            self.engine.step()  # optimizer step only at the accumulation boundary (last micro-batch)
            for key, value in loss_metrics.items():
                out[key] += float(value) * u / local_units
            out["learner/tokens"] += float(part.rollout.response_mask.sum())
            out["learner/sequences"] += float(part.rollout.batch_size)
        self.steps += 1
        grad_norm = self.engine.get_global_grad_norm()
        out["learner/grad_norm"] = float(grad_norm if grad_norm is not None else plain_norm)
        out["learner/lr"] = float(self.optimizer.param_groups[0]["lr"])
        return out

    def _plain_grad_norm(self) -> float:
        """Pre-clip global grad norm where DeepSpeed does not record one (ZeRO-0 fp32: grads are
        whole and already averaged over ranks after the boundary backward); NaN elsewhere."""
        if self.config.learner.zero_stage != 0 or self.config.model.dtype != "float32":
            return float("nan")
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # ------------------------------------------------------------------------------- weights, state
    def export_weights(self, every_rank: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Full policy weights on CPU as (HF name, tensor), e.g. 'model.layers.0.mlp.up_proj.weight',
        in the engine's dtype (bf16 stays bf16: half the bytes to ship; vLLM casts on load).

        Collective under ZeRO-3 (every rank must call it: the shards are all-gathered); only rank 0
        returns the tensors (unless every_rank, for tests), other ranks return [] so the driver fetches
        one copy. Tied embeddings appear once (as 'model.embed_tokens.weight'), which is what vLLM's
        loader expects for tied models.
        """
        import deepspeed

        named = list(self.engine.module.named_parameters())
        gather = (deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
                  if self.config.learner.zero_stage == 3 else nullcontext())
        with gather:
            if self.rank != 0 and not every_rank:
                return []
            return [(name, p.detach().to("cpu", copy=True)) for name, p in named]

    # ------------------------------------------------- collective weight sync (workers/weight_sync.py)
    def weight_sync_device(self) -> str:
        return self.device.type

    def weight_metas(self) -> list[TensorMeta]:
        """(HF name, full shape, dtype) of every policy parameter, in the order broadcast_weights sends."""
        return [tensor_meta(name, p) for name, p in self.engine.module.named_parameters()]

    def listen_weight_sync(self, host: str, timeout_s: float) -> int:
        """Rank 0: open the weight-sync rendezvous on a port the OS picks (returned)."""
        self.close_weight_sync()
        self._weight_sender = WeightSender(host, timeout_s)
        return self._weight_sender.port

    def join_weight_sync(self, world_size: int, backend: str) -> None:
        """Rank 0: join the group as rank 0 (blocks until every rollout worker has joined)."""
        self._weight_sender.join(world_size, backend, self.device)

    def broadcast_weights(self, bucket_bytes: int) -> int:
        """Send the full policy weights to the group in buckets, in named_parameters (layer) order;
        returns the bytes sent (0 on ranks > 0).

        Every rank must call it: under ZeRO-3 each bucket's parameters are all-gathered over the learner
        ranks (a collective of the learner's own group) just before rank 0 packs and sends them, so no
        rank ever holds more than a bucket beyond its shard.
        """
        import deepspeed

        named = list(self.engine.module.named_parameters())
        params = dict(named)
        sender = getattr(self, "_weight_sender", None) if self.rank == 0 else None
        if self.rank == 0 and (sender is None or sender.group is None):
            raise RuntimeError("learner rank 0 has not joined a weight-sync group (listen/join_weight_sync)")

        def gathered_buckets():
            for bucket in plan_buckets([tensor_meta(n, p) for n, p in named], bucket_bytes):
                tensors = [params[m.name] for m in bucket.tensors]
                gather = (deepspeed.zero.GatheredParameters(tensors, modifier_rank=None)
                          if self.config.learner.zero_stage == 3 else nullcontext())
                with gather:
                    yield bucket, tensors  # the sender packs them before the gather is released

        with torch.no_grad():
            if sender is None:
                for _ in gathered_buckets():
                    pass
                return 0
            return sender.send(gathered_buckets())

    def close_weight_sync(self) -> None:
        sender = getattr(self, "_weight_sender", None)
        if sender is not None:
            sender.close()
        self._weight_sender = None

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Model, optimizer, step counter and every rank's RNG states under `directory` (collective)."""
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"klrl_steps": self.steps})
        torch.save(_rng_state(), directory / CHECKPOINT_TAG / f"rng_rank{self.rank}.pt")
        if self.world_size > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore what save_checkpoint wrote; the reference is rebuilt from its folder, not saved.

        Under ZeRO-3 load into a freshly built learner (DeepSpeed cannot load into a partitioned module
        that has already saved).
        """
        directory = Path(directory)
        if not (directory / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"no klrl learner checkpoint at '{directory}' "
                                    f"(expected {directory}/{CHECKPOINT_TAG})")
        path, client_state = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at '{directory}'")
        self.steps = int(client_state["klrl_steps"])
        _set_rng_state(torch.load(directory / CHECKPOINT_TAG / f"rng_rank{self.rank}.pt", weights_only=False))

    def snapshot(self, directory: str | os.PathLike) -> None:
        """Save this freshly built learner (pi_ref weights, empty optimizer, counters 0) for `reset`.

        Collective: every rank saves its part into the same directory (on a filesystem all ranks share).
        """
        if self.steps:
            raise RuntimeError("snapshot() must be taken before the first update (it is what reset returns to)")
        self.save_checkpoint(directory)
        self.fresh = Path(directory)

    def reset(self, config: Config) -> None:
        """Become the learner a fresh build for `config` would be: pi_ref weights, a fresh optimizer (no
        moments, its lr and weight decay), step counters at 0, config's seeds and call-time settings.

        DeepSpeed's own checkpoint of the fresh engine is loaded back, which restores ZeRO's partitioned
        fp32 weights and optimizer state under every stage. Settings built into the engine (ZeRO stage,
        dtype, micro-batch size, ...) cannot change: a config that differs in them raises.
        """
        if self.fresh is None:
            raise RuntimeError("reset() needs snapshot() taken right after construction")
        changed = sorted(k for k, v in built_settings(config).items() if built_settings(self.config).get(k) != v)
        if changed:
            raise ValueError(f"reset: {changed} are built into this learner; build a new one for them")
        self.config = config
        self.load_checkpoint(self.fresh)
        self.engine.micro_steps = 0  # not in DeepSpeed's checkpoint; 0 in a fresh engine
        for group in self.optimizer.param_groups:
            group.update(lr=config.learner.lr, weight_decay=config.learner.weight_decay)
        _seed_everything(config.run.seed)

    def ping(self) -> int:
        """Cheap liveness check for the actor wrapper; returns the rank."""
        return self.rank

