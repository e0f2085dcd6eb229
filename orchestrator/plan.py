"""`klrl plan`: GPU memory per learner and rollout GPU, GPUs and GPU-hours of a study, before renting any.

    klrl plan SPACE.yaml [--set k=v ...] [--gpu h100] [--gpu-memory-gib 80]
                         [--learner-tokens-per-s N] [--rollout-tokens-per-s N]

The memory model counts bytes from the architecture (config.json of a local model folder, `model.tiny`
for 'tiny', a built-in table for the seed model) and the config, for the worst micro-batch (every row at
max_model_len, or the token budget). A learner rank holds, by ZeRO stage s over W ranks (DeepSpeed
stage_1_and_2 / stage3 / bf16 optimizers; Rajbhandari et al. 2020, ZeRO, table 1):

    policy weights      b N                   (s = 3: b N / W + the head and one layer gathered)
    reference weights   b N                   whole, never sharded (workers/learner.py)
    fp32 master         4 N (bf16, s = 0)     4 N / W (s >= 1: DeepSpeed keeps an fp32 partition copy)
    Adam m, v           8 N                   8 N / W (s >= 1)
    gradients           b N (s <= 1; + 4 N float32 for bf16: the master step's copies, accumulation at s = 1)
                        b N / W + b * min(N, 5e8) reduce bucket + 4 N / W fp32 at the step (s >= 2)
    activations         tokens * L * per-layer bytes, without checkpointing (below);
                        tokens * (L * b H + one layer's bytes) with checkpointing (the layer recomputed)
    logits chunk        kl_chunk_size * V * (b + 8 + 4) bytes: the chunk's logits, log p and p in float32 and
                        a float32 copy of bf16 logits (core/lm_head.py); with the reference (score, the
                        exact-KL arm in update) its logits and log q too: (2b + 12 + 4) per token

Per-layer saved activations of a Qwen2/Llama block per token (b = bytes of the dtype; Korthikanti et
al. 2022, "Reducing activation recomputation", sec. 4, redone for RMSNorm, GQA and SwiGLU): two RMSNorms
(4 + 2b) H each (float32 input, normalised copy, output), q, k, v and attention output entering SDPA
(k, v repeated to H heads when a padding mask rules out SDPA's GQA path) b H each, o_proj input b H,
SwiGLU gate, act, up and product 4 b I: (8 + 9b) H + 4 b I. A rollout GPU holds vLLM's weights b N,
the KV cache 2 L kv_heads head_dim b per token for all n_samples x prompts_per_step / num_workers
sequences of max_model_len, and a runtime reserve (CUDA graphs, sampler, activations); vLLM must fit
them in gpu_memory_utilization of the GPU.

Time: a step is the rollout (generated tokens / rollout tokens/s) then the learner (prompt + response
tokens / learner tokens/s, per GPU, score + one update epoch as benchmarks/learner.py measures it). The
defaults per GPU type are estimates, not measurements: learner = 35% MFU of the dense bf16 peak on this
architecture's FLOPs (PaLM appendix B); rollout = decode at 50% of HBM bandwidth reading the weights and
the batch's KV cache each step. Replace them with benchmarks/learner.py --cuda and benchmarks/rollout.py
figures via --learner-tokens-per-s / --rollout-tokens-per-s. Every estimate is an upper bound on
lengths: responses are taken at max_new_tokens and prompts at max_model_len - max_new_tokens.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.config import Config

GIB = 2**30
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements)
LEARNER_RESERVE_GIB = 2.0  # CUDA context, NCCL buffers, cuBLAS workspace, allocator slack
ROLLOUT_RESERVE_GIB = 3.0  # vLLM: CUDA graphs, sampler logits for max_num_seqs rows, profiled activations
LEARNER_MFU, ROLLOUT_BANDWIDTH_SHARE = 0.35, 0.5


@dataclass(frozen=True)
class Arch:
    """The shape a memory model needs (Qwen2/Llama-style decoder)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def layer_params(self) -> int:
        """q/k/v (with bias, as Qwen2), o, gate/up/down, two RMSNorm weights."""
        h, kv = self.hidden, self.kv_dim
        return h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


@dataclass(frozen=True)
class GPU:
    memory_gib: float
    bf16_tflops: float  # dense, vendor datasheet
    hbm_tb_s: float


GPUS = {  # NVIDIA datasheets (SXM parts)
    "h100": GPU(80, 989, 3.35), "h200": GPU(141, 989, 4.8), "a100-80g": GPU(80, 312, 2.04),
    "l40s": GPU(48, 362, 0.864),
}

# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json (Qwen2ForCausalLM): hidden_size 1536,
# num_hidden_layers 28, num_attention_heads 12, num_key_value_heads 2, intermediate_size 8960,
# vocab_size 151936, tie_word_embeddings false; 1,777,088,000 parameters.
KNOWN_ARCHS = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": Arch(1536, 28, 12, 2, 8960, 151936, tied=False)}


class PlanError(ValueError):
    """The architecture cannot be determined; the message names the field."""


def resolve_arch(config: Config) -> Arch:
    """From model.tiny for 'tiny', a local folder's config.json, else the built-in table."""
    path = config.model.path
    if path == "tiny":
        from tasks.tiny_model import SPECIAL_TOKENS, TAG_TOKENS

        t = config.model.tiny  # its tokenizer: specials, tags, one token per byte; untied embeddings
        return Arch(t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size,
                    len(SPECIAL_TOKENS) + len(TAG_TOKENS) + 256, tied=False)
    local = Path(path) / "config.json"
    if local.is_file():
        c = json.loads(local.read_text())
        c = c.get("text_config", c)
        return Arch(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                    c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"],
                    c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)), head_dim=c.get("head_dim") or 0)
    if path in KNOWN_ARCHS:
        return KNOWN_ARCHS[path]
    raise PlanError(f"model.path: no config.json at '{path}' and no built-in shape for it (known: "
                    f"{sorted(KNOWN_ARCHS)}); point model.path at a local model folder")


@dataclass
class LearnerMemory:
    """Bytes on one learner rank: static components, then the two phases' peaks."""

    parts: dict[str, float] = field(default_factory=dict)
    peak_score: float = 0.0
    peak_update: float = 0.0


def micro_batch_tokens(config: Config, seq_len: int) -> int:
    """Tokens (rows x padded length) of the largest micro-batch."""
    lc = config.learner
    if lc.max_tokens_per_micro_batch:
        return min(max(lc.max_tokens_per_micro_batch, seq_len), lc.micro_batch_size * seq_len)
    return lc.micro_batch_size * seq_len


def activation_bytes_per_token_layer(arch: Arch, b: int) -> float:
    """Saved activations of one decoder block per token, without checkpointing (module docstring)."""
    return (8 + 9 * b) * arch.hidden + 4 * b * arch.intermediate


def learner_memory(arch: Arch, config: Config, seq_len: int, response_len: int, device: str = "cuda",
                   exact_in_loss: bool | None = None) -> LearnerMemory:
    """One learner rank's memory for micro-batches of rows of seq_len tokens (response_len of them scored)."""
    lc = config.learner
    b = 2 if config.model.dtype == "bfloat16" else 4
    n, w, s = arch.params, lc.num_workers, lc.zero_stage
    h, v, layers = arch.hidden, arch.vocab, arch.layers
    parts: dict[str, float] = {}
    head_and_layer = (v * h + arch.layer_params) * b
    parts["policy weights"] = b * n / w + head_and_layer if s == 3 else b * n
    parts["reference weights"] = b * n
    if b == 2 or s >= 1:
        parts["fp32 master weights"] = 4 * n / (w if s >= 1 else 1)
    parts["Adam states"] = 8 * n / (w if s >= 1 else 1)
    static = sum(parts.values())
    if s <= 1:
        grads = b * n + (4 * n if b == 2 else 0)  # bf16: float32 copies for the master step (s = 1: accumulation)
    else:
        grads = b * n / w + b * min(n, REDUCE_BUCKET) + 4 * n / w
    tokens = micro_batch_tokens(config, seq_len)
    rows = max(1, tokens // seq_len)
    per_layer = activation_bytes_per_token_layer(arch, b)
    # Autograd frees a layer's saved tensors as its backward runs, so the peak is the saved set itself
    # (with checkpointing: every layer's input, plus the one layer being recomputed).
    per_token = layers * b * h + per_layer if lc.gradient_checkpointing else layers * per_layer
    act = tokens * per_token
    act += rows * seq_len * seq_len  # the 4-D boolean attention mask
    chunk_tokens = min(lc.kl_chunk_size, tokens, rows * response_len) * v
    # core/lm_head.py per chunk: the logits in the model's dtype, log p and p in float32, and a float32
    # copy of the logits while it is formed unless the logits already are float32 at temperature 1.
    transient = 0 if b == 4 and config.rollout.temperature == 1.0 else 4
    policy_chunk = chunk_tokens * (b + 8 + transient)
    pair_chunk = chunk_tokens * (2 * b + 12 + transient)  # + the reference's logits and log q
    if exact_in_loss is None:
        exact_in_loss = config.algorithm.kl_mode == "in_loss" and config.algorithm.kl_estimator.startswith("exact_")
    hidden_io = tokens * h * b * 4  # final hidden states of policy and reference, packed copies, their grads
    parts["gradients (peak)"] = grads
    parts["activations"] = act
    parts["final hidden states"] = hidden_io
    parts["logits chunk"] = pair_chunk if exact_in_loss else policy_chunk
    if chunk_tokens < min(tokens, rows * response_len) * v:
        parts["logits chunk"] += b * v * h  # several chunks: autograd sums their head gradients in one more buffer
    no_grad_forward = tokens * (3 * b * arch.intermediate + (8 + 4 * b) * h)  # one block's transients
    reserve = LEARNER_RESERVE_GIB * GIB if device == "cuda" else 0.0
    if reserve:
        parts["runtime reserve"] = reserve
    peak_update = sum(parts.values())  # the table's rows add up to it
    peak_score = static + no_grad_forward + pair_chunk + hidden_io + reserve
    return LearnerMemory(parts, peak_score, peak_update)


def rollout_memory(arch: Arch, config: Config, device: str = "cuda") -> dict[str, float]:
    """Bytes vLLM needs on one rollout GPU to run a step's sequences all at once."""
    r = config.rollout
    b = 2 if config.model.dtype == "bfloat16" else 4
    seqs = -(-config.task.prompts_per_step * r.n_samples // r.num_workers)
    kv_per_token = 2 * arch.layers * arch.kv_dim * b
    tp = r.tensor_parallel_size
    parts = {"weights": b * arch.params / tp, "KV cache": seqs * r.max_model_len * kv_per_token / tp}
    if device == "cuda":
        parts["runtime reserve"] = ROLLOUT_RESERVE_GIB * GIB
    return parts


# ------------------------------------------------------------------------------------------- time
def _matmul_params(arch: Arch) -> int:
    """Parameters in matmuls: every block's projections plus the output layer (not the embedding lookup)."""
    return arch.layers * (arch.layer_params - 2 * arch.hidden) + arch.vocab * arch.hidden


def learner_flops_per_token(arch: Arch, config: Config, seq_len: int) -> float:
    """Matmul FLOPs per token of score (2 forwards) + ppo_epochs x (forward + backward, plus the
    recomputed forwards of checkpointed blocks and of the chunked output layer)."""
    n, epochs = _matmul_params(arch), config.learner.ppo_epochs
    attention = 4 * arch.layers * seq_len * arch.hidden  # QK^T and AV of one forward
    recompute = 2 * (n - arch.vocab * arch.hidden) if config.learner.gradient_checkpointing else 0
    per_epoch = 6 * n + 3 * attention + recompute + 2 * arch.vocab * arch.hidden
    return 4 * n + 2 * attention + epochs * per_epoch


@dataclass
class TrialTime:
    gpus: float
    rollout_s: float  # per RL step
    learner_s: float
    eval_s: float  # per trial
    learner_tokens_per_s: float  # per GPU, score + one update epoch
    rollout_tokens_per_s: float  # per GPU, generated tokens

    def hours(self, steps: int) -> float:
        return (steps * (self.rollout_s + self.learner_s) + self.eval_s) / 3600


def trial_time(arch: Arch, config: Config, gpu: GPU, learner_tps: float | None = None,
               rollout_tps: float | None = None) -> TrialTime:
    """Wall time of a trial's steps and evals from tokens/s figures (module docstring)."""
    r, lc, t, run = config.rollout, config.learner, config.task, config.run
    b = 2 if config.model.dtype == "bfloat16" else 4
    seq_len, new = r.max_model_len, r.max_new_tokens
    gpus = lc.num_workers * lc.gpus_per_worker + r.num_workers * r.gpus_per_worker
    seqs = -(-t.prompts_per_step * r.n_samples // r.num_workers)  # per rollout worker
    if rollout_tps is None:  # one decode step reads the weights and every sequence's KV cache
        context = seq_len - new / 2
        step_bytes = b * arch.params + seqs * context * 2 * arch.layers * arch.kv_dim * b
        rollout_tps = seqs / (step_bytes / (ROLLOUT_BANDWIDTH_SHARE * gpu.hbm_tb_s * 1e12))
    flops = learner_flops_per_token(arch, config, seq_len)
    one_epoch = learner_flops_per_token(arch, config.replace(**{"learner.ppo_epochs": 1}), seq_len)
    if learner_tps is None:
        learner_tps = LEARNER_MFU * gpu.bf16_tflops * 1e12 / one_epoch
    batch_tokens = t.prompts_per_step * r.n_samples * seq_len
    learner_s = batch_tokens * flops / one_epoch / (learner_tps * max(lc.num_workers * lc.gpus_per_worker, 1e-9))
    rollout_s = seqs * new / rollout_tps
    evals = 0 if run.eval_every == 0 else run.steps // run.eval_every + 1 + (run.steps % run.eval_every > 0)
    eval_s = evals * t.eval_size * run.eval_n_samples * new / (rollout_tps * r.num_workers)
    return TrialTime(gpus, rollout_s, learner_s, eval_s, learner_tps, rollout_tps)


# ------------------------------------------------------------------------------------ study plan
@dataclass
class RolePlan:
    """One GPU role's memory: components, need, budget (None on CPU) and the fields that lower it."""

    name: str  # "learner GPU" or "rollout GPU"
    title: str
    rows: list[tuple[str, float]]
    need: float
    budget: float | None
    budget_note: str
    fields: list[str]

    @property
    def fits(self) -> bool:
        return self.budget is None or self.need <= self.budget


def learner_role(arch: Arch, config: Config, gpu_gib: float) -> RolePlan:
    lc, r = config.learner, config.rollout
    on_gpu = lc.gpus_per_worker > 0
    mem = learner_memory(arch, config, r.max_model_len, r.max_new_tokens, device="cuda" if on_gpu else "cpu")
    budget = gpu_gib * min(1.0, lc.gpus_per_worker) * GIB if on_gpu else None
    fields = ([] if lc.gradient_checkpointing else ["learner.gradient_checkpointing"]) + [
        "learner.max_tokens_per_micro_batch", "learner.micro_batch_size", "learner.kl_chunk_size"]
    fields += (["learner.zero_stage"] if lc.zero_stage < 3 else []) + ["learner.num_workers", "rollout.max_model_len"]
    title = (f"Learner GPU, per rank ({lc.num_workers} per trial; ZeRO-{lc.zero_stage}, {config.model.dtype}, "
             f"gradient checkpointing {'on' if lc.gradient_checkpointing else 'off'}, micro-batch <= "
             f"{micro_batch_tokens(config, r.max_model_len):,} tokens, logits chunk {lc.kl_chunk_size:,} tokens)")
    rows = list(mem.parts.items()) + [("peak in score", mem.peak_score), ("peak in update", mem.peak_update)]
    note = "the GPU's memory" + (f" x learner.gpus_per_worker {lc.gpus_per_worker:g}" if lc.gpus_per_worker < 1 else "")
    return RolePlan("learner GPU", title, rows, max(mem.peak_score, mem.peak_update), budget, note, fields)


def rollout_role(arch: Arch, config: Config, gpu_gib: float) -> RolePlan:
    r = config.rollout
    parts = rollout_memory(arch, config, device="cuda" if r.gpus_per_worker > 0 else "cpu")
    seqs = -(-config.task.prompts_per_step * r.n_samples // r.num_workers)
    budget = gpu_gib * r.gpu_memory_utilization * GIB if r.gpus_per_worker > 0 else None
    title = (f"Rollout GPU, per vLLM worker ({r.num_workers} per trial; {seqs} sequences x {r.max_model_len:,} "
             f"tokens at once, tensor parallel {r.tensor_parallel_size})")
    fields = ["rollout.gpu_memory_utilization", "rollout.num_workers", "rollout.max_model_len",
              "task.prompts_per_step", "rollout.tensor_parallel_size"]
    need = sum(parts.values())
    note = f"rollout.gpu_memory_utilization {r.gpu_memory_utilization:g} x {gpu_gib:g} GiB"
    return RolePlan("rollout GPU", title, list(parts.items()) + [("total", need)], need, budget, note, fields)


@dataclass
class StudyPlan:
    name: str
    arch: Arch
    model: str
    trials: int
    steps: int
    roles: list[RolePlan]
    time: TrialTime
    gpu_name: str
    tps_given: tuple[bool, bool]


def plan_study(study, gpu_name: str = "h100", gpu_gib: float | None = None, learner_tps: float | None = None,
               rollout_tps: float | None = None) -> StudyPlan:
    """The worst grid point's learner and rollout memory, and one trial's time (grid points share shapes)."""
    gpu = GPUS[gpu_name]
    gpu_gib = gpu_gib or gpu.memory_gib
    configs = [study.trial_config(labels) for labels in study.grid()]
    arch = resolve_arch(configs[0])
    learners = [learner_role(arch, c, gpu_gib) for c in configs]
    rollouts = [rollout_role(arch, c, gpu_gib) for c in configs]
    roles = [max(learners, key=lambda p: p.need), max(rollouts, key=lambda p: p.need)]
    time = trial_time(arch, configs[0], gpu, learner_tps, rollout_tps)
    return StudyPlan(study.name, arch, configs[0].model.path, study.num_trials(), configs[0].run.steps, roles, time,
                     gpu_name, (learner_tps is not None, rollout_tps is not None))


def problems(plan: StudyPlan) -> list[str]:
    """One line per GPU role whose estimate exceeds its memory, naming the fields to change."""
    return [f"{role.name} needs {role.need / GIB:.1f} GiB, more than its "
            f"{role.budget / GIB:.1f} GiB ({role.budget_note}); change {', '.join(role.fields)}"
            for role in plan.roles if not role.fits]


def format_plan(plan: StudyPlan) -> str:
    a, t = plan.arch, plan.time
    lines = [f"Study {plan.name}: {plan.trials} trial(s) x {plan.steps} steps; model {plan.model} "
             f"({a.params / 1e9:.2f} B parameters, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab:,}, "
             f"{'tied' if a.tied else 'untied'} embeddings); GPU {plan.gpu_name}"]
    for role in plan.roles:
        lines += ["", role.title]
        lines += [f"  {name:<26}{value / GIB:>8.1f} GiB" for name, value in role.rows]
        verdict = ("runs on CPU (no GPU requested)" if role.budget is None else
                   f"{'fits' if role.fits else 'DOES NOT FIT'}: {role.need / GIB:.1f} GiB of "
                   f"{role.budget / GIB:.1f} GiB ({role.budget_note})")
        lines.append(f"  {verdict}")
    if t.gpus == 0:
        return "\n".join(lines + ["", "No GPUs requested: the study runs on CPU (times: docs/BENCHMARKS.md)"])
    given = ["measured (flag)" if g else "estimate" for g in plan.tps_given]
    hours = t.hours(plan.steps)
    lines += ["", "Time per trial (upper bound: every response at max_new_tokens)",
              f"  GPUs per trial              {t.gpus:g}",
              f"  tokens/s per GPU            learner {t.learner_tokens_per_s:,.0f} ({given[0]}), "
              f"rollout {t.rollout_tokens_per_s:,.0f} ({given[1]})",
              f"  one RL step                 rollout {t.rollout_s:,.1f} s + learner {t.learner_s:,.1f} s",
              f"  evaluations                 {t.eval_s:,.0f} s",
              f"  trial                       {hours:,.1f} h, {hours * t.gpus:,.1f} GPU-hours",
              f"Study: {plan.trials} trial(s), {plan.trials * hours * t.gpus:,.0f} GPU-hours"]
    return "\n".join(lines)


def check_study(study, gpu_gib: float, gpu_name: str = "h100") -> list[str]:
    """`klrl validate --gpu-memory-gib`: the plan's refusals for this study (empty when it fits)."""
    return problems(plan_study(study, gpu_name, gpu_gib))


def cmd_plan(args) -> int:
    """`klrl plan`: print the tables; exit 2 naming the fields to change when a role does not fit."""
    from orchestrator.config_io import SpecError
    from orchestrator.search_space import load_study

    try:
        study = load_study(args.space, args.set)
        plan = plan_study(study, args.gpu, args.gpu_memory_gib, args.learner_tokens_per_s, args.rollout_tokens_per_s)
    except (SpecError, PlanError) as exc:
        print(f"klrl: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    refusals = problems(plan)
    for line in refusals:
        print(f"klrl: error: {args.space}: {line}", file=sys.stderr)
    return 2 if refusals else 0


def add_parser(sub) -> None:
    """The `plan` subcommand's arguments (orchestrator/cli.py registers it)."""
    p = sub.add_parser("plan", help="GPU memory per learner/rollout GPU and GPU-hours of a study")
    p.add_argument("space", help="study file, e.g. search_spaces/seed_palindrome_r1_1p5b.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU type: memory and speed defaults")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="GPU memory (default: the GPU type's)")
    p.add_argument("--learner-tokens-per-s", type=float, default=None,
                   help="measured learner tokens/s per GPU (benchmarks/learner.py --cuda); default: estimate")
    p.add_argument("--rollout-tokens-per-s", type=float, default=None,
                   help="measured generated tokens/s per rollout GPU; default: estimate")
    p.set_defaults(func=cmd_plan)
