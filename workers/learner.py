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
"""
from __future__ import annotations

import os
import random
from contextlib import nullcontext
import socket
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from core.config import Config
from core.kl import exact_token_kl
from core.losses import policy_loss
from core.metrics import entropy_from_logits
from core.types import RolloutBatch, TokenScores, TrainBatch
from workers.sequence import micro_batches, model_inputs, response_logits, token_logprobs, trim_padding
from workers.weight_transfer import TensorMeta, WeightSender, plan_buckets, tensor_meta

CHECKPOINT_TAG = "klrl"
DIST_TIMEOUT = timedelta(minutes=10)
SUMMED_METRICS = ("learner/tokens", "learner/sequences")  # LearnerGroup sums these over ranks


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_model_dir(path: str | os.PathLike, field: str) -> Path:
    """The model folder as a Path; FileNotFoundError naming `field` if it is not a HF model folder."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{field}: no Hugging Face model folder at '{folder}' (expected {folder}/config.json); "
                                "resolve hub ids and 'tiny' with tasks.policy.resolve_policy first")
    return folder


def _output_vocab(model: torch.nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_vocab(policy: torch.nn.Module, reference: torch.nn.Module, policy_path: Path, ref_path: Path) -> None:
    """KL between two models is only defined over one shared vocabulary."""
    p, r = _output_vocab(policy), _output_vocab(reference)
    if p != r:
        raise ValueError(f"reference_path: vocabulary mismatch, policy '{policy_path}' has {p} output tokens but "
                         f"reference '{ref_path}' has {r}; the reference must share the policy's tokenizer")


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


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.config, self.rank, self.world_size = config, rank, world_size
        policy_path = check_model_dir(model_path, "model_path")
        ref_path = check_model_dir(reference_path or model_path, "reference_path")
        cuda = torch.cuda.is_available()
        if config.learner.backend == "nccl" and not cuda:
            raise ValueError("learner.backend: 'nccl' needs a CUDA device; this learner has none, use 'gloo'")
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        init_distributed(config.learner.backend, rank, world_size, master_addr, master_port)
        torch.manual_seed(config.run.seed)
        dtype = getattr(torch, config.model.dtype)
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
        reference = AutoModelForCausalLM.from_pretrained(ref_path, dtype=dtype)
        check_same_vocab(policy, reference, policy_path, ref_path)
        self.reference = reference.to(self.device).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learner.lr,
                                      weight_decay=config.learner.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=policy, optimizer=optimizer, config=deepspeed_config(config, world_size),
            dist_init_required=False)
        self.steps = 0  # optimizer steps taken (saved in checkpoints)

    # ----------------------------------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> TokenScores:
        """Per-token log pi_old, log pi_ref, entropy and exact KL (both directions) for this rank's rows.

        All (B, T) float32, zero on padding. KL is measured whatever the kl_mode, as a diagnostic.
        """
        self.engine.eval()
        T, temperature = batch.response_ids.shape[1], self.config.rollout.temperature
        parts = []
        for rows in micro_batches(batch.batch_size, self.config.learner.micro_batch_size):
            inputs = model_inputs(trim_padding(batch.rows(rows))).to(self.device)
            logits = response_logits(self.engine, inputs, temperature)  # (b, t, V)
            ref_logits = response_logits(self.reference, inputs, temperature)
            reverse, forward = exact_token_kl(logits, ref_logits, self.config.learner.kl_chunk_size)
            values = (token_logprobs(logits, inputs.response_ids), token_logprobs(ref_logits, inputs.response_ids),
                      entropy_from_logits(logits, self.config.learner.kl_chunk_size), reverse, forward)
            mask = inputs.response_mask
            parts.append([_pad_cols(torch.where(mask, v.float(), 0.0).cpu(), T) for v in values])
            del logits, ref_logits
        return TokenScores(*(torch.cat(column) for column in zip(*parts)))

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
        slices = micro_batches(per_mini, lc.micro_batch_size)
        # DeepSpeed steps the optimizer after `gas` micro-batches; a shard's micro-batch count varies
        # with the batch, so set it per call (train_batch_size = configured micro * gas * world).
        self.engine.set_train_batch_size(self.engine.train_micro_batch_size_per_gpu() * len(slices) * self.world_size)
        self.engine.train()
        totals: dict[str, float] = defaultdict(float)
        n_steps = 0
        for _ in range(lc.ppo_epochs):
            for m in range(lc.mini_batches):
                mini = batch.rows(slice(m * per_mini, (m + 1) * per_mini))
                for key, value in self._mini_batch_step(mini, slices).items():
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

    def _global_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return float(t.item())

    def _mini_batch_step(self, mini: TrainBatch, slices: list[slice]) -> dict[str, float]:
        """One optimizer step: forward/backward per micro-batch, loss weighted by its share of units."""
        algo, lc = self.config.algorithm, self.config.learner
        parts = [mini.rows(s) for s in slices]
        units = [self._units(p) for p in parts]
        local_units, global_units = sum(units), self._global_sum(sum(units))
        exact = algo.kl_mode == "in_loss" and algo.kl_estimator.startswith("exact_")
        out: dict[str, float] = defaultdict(float)
        for part, u in zip(parts, units):
            trimmed = trim_padding(part.rollout)
            t = trimmed.response_ids.shape[1]
            inputs = model_inputs(trimmed).to(self.device)
            logits = response_logits(self.engine, inputs, self.config.rollout.temperature)
            exact_kl = None
            if exact:
                with torch.no_grad():
                    ref_logits = response_logits(self.reference, inputs, self.config.rollout.temperature)
                exact_kl = exact_token_kl(logits, ref_logits, lc.kl_chunk_size)
            loss, loss_metrics = policy_loss(
                token_logprobs(logits, inputs.response_ids), part.old_logprobs[:, :t].to(self.device),
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

    def ping(self) -> int:
        """Cheap liveness check for the actor wrapper; returns the rank."""
        return self.rank

