"""The one frozen, typed configuration of a klrl trial.

Every setting lives in exactly one dataclass field with a one-line docstring (the string literal under
the field). `Config.from_dict` validates a plain nested dict once, at load, and every error names the
dotted field and the allowed values. YAML parsing and `--set a.b=c` overrides live in
`orchestrator/config_io.py`; this module is stdlib-only so workers and pure math can import it.

The seed study's three arms are expressed with two settings that cannot contradict each other:
`algorithm.kl_mode` (where the KL goes) and `algorithm.kl_estimator` (which estimator):
  none                      -> kl_mode=none
  reverse KL, k1 in reward  -> kl_mode=in_reward, kl_estimator=k1
  "forward-KL style"        -> kl_mode=in_loss,   kl_estimator=k3
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

KL_MODES = ("none", "in_reward", "in_loss")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_plus", "exact_reverse", "exact_forward")
ADVANTAGE_ESTIMATORS = ("rloo", "grpo", "reinforce")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
TASKS = ("palindrome", "deepscaler")
DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "gloo", "nccl")
WEIGHT_SYNCS = ("object_store", "collective")
# Keys klrl once had, with why they went: an old study file that sets one is told so by name.
REMOVED_KEYS = {
    "rollout.enable_sleep_mode": "removed: a learner and a rollout engine never share a GPU in klrl, so "
                                 "vLLM's sleep mode would free memory nobody uses (docs/GPU.md); delete the key",
}


class ConfigError(ValueError):
    """A config value is invalid. The message names the dotted field and what is allowed."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field whose docstring is kept in metadata (shown by `klrl config --explain`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape and warm start of the locally built tiny Qwen2 policy (used when model.path == 'tiny')."""

    hidden_size: int = _doc("Width of the tiny Qwen2.", 128)
    num_layers: int = _doc(
        "Transformer blocks. 2, not more: per second of CPU a 2-block model learns 5-8-letter palindromes "
        "(pick an order, mirror it) reliably, 3-4 blocks learn them later and far less predictably.", 2)
    num_heads: int = _doc("Attention heads (must divide hidden_size).", 4)
    num_kv_heads: int = _doc("Key/value heads (GQA; must divide num_heads).", 2)
    intermediate_size: int = _doc("MLP width.", 384)
    max_position_embeddings: int = _doc("Longest sequence the tiny model supports.", 512)
    sft_steps: int = _doc("Supervised warm-start steps: a fixed schedule (warm-up, cosine to 0), no early stop.", 1500)
    sft_batch_size: int = _doc("Sequences per warm-start step.", 32)
    sft_lr: float = _doc("Warm-start AdamW peak learning rate.", 3e-3)
    sft_examples: int = _doc("Generated palindrome letter multisets the warm start draws from.", 20000)
    sft_target_accuracy: float = _doc(
        "Exact expected accuracy at T=1.0 (validation prompts) the warm-started model is calibrated to by "
        "scaling its output layer; it only ever flattens, a weaker model is kept as is (0 = off).", 0.45)
    seed: int = _doc("Seed of weight init and warm-start data (part of the cache key).", 0)


@dataclass(frozen=True)
class ModelConfig:
    """Which policy to train; the reference policy is a frozen copy of it."""

    path: str = _doc("'tiny' (built and warm-started locally) or a HF causal-LM folder or hub id.", "tiny")
    dtype: str = _doc(f"Compute dtype of policy and reference: one of {DTYPES}.", "float32")
    tiny: TinyModelConfig = _doc("Tiny-model shape and warm start.", factory=TinyModelConfig)


@dataclass(frozen=True)
class RolloutConfig:
    """vLLM sampling and rollout-actor resources."""

    n_samples: int = _doc("Responses sampled per prompt (the RLOO/GRPO group size).", 8)
    temperature: float = _doc("Sampling temperature (> 0; 1.0 samples the policy itself).", 1.0)
    top_p: float = _doc("Nucleus sampling mass; must be 1.0: the learner scores the full softmax, with no "
                        "nucleus mask, so only top_p = 1 keeps pi_old the sampling distribution.", 1.0)
    max_new_tokens: int = _doc("Longest response in tokens; longer ones are clipped.", 32)
    max_model_len: int = _doc("vLLM max_model_len (prompt + response tokens).", 512)
    kv_cache_space_gib: int = _doc("VLLM_CPU_KVCACHE_SPACE on CPU, in GiB.", 1)
    gpu_memory_utilization: float = _doc("vLLM GPU memory fraction (GPU only), in (0, 1].", 0.5)
    tensor_parallel_size: int = _doc(
        "vLLM tensor parallel size; must be 1: a rollout actor holds one GPU and one engine (scale "
        "rollouts with rollout.num_workers).", 1)
    num_workers: int = _doc("Rollout actors per trial; prompts are split across them.", 1)
    weight_sync: str = _doc(
        f"How the learner's weights reach vLLM after each update: one of {WEIGHT_SYNCS} ('object_store': "
        "through Ray's object store; 'collective': a process group between learner and engines).",
        "object_store")
    cpus_per_worker: float = _doc("CPU bundle per rollout actor.", 1.0)
    gpus_per_worker: float = _doc("GPU bundle per rollout actor (0 on CPU machines).", 0.0)
    node_resource: str = _doc(
        "Custom Ray resource that pins the rollout actors to the nodes that have it ('' = anywhere): each "
        "rollout bundle also asks for 0.001 of it, so start those nodes with e.g. `ray start --resources="
        "'{\"rollout_node\": 1}'`. Different names for learner and rollout put them on different nodes.", "")


@dataclass(frozen=True)
class LearnerConfig:
    """DeepSpeed learner engine and its actors."""

    num_workers: int = _doc("Data-parallel learner actors per trial.", 1)
    zero_stage: int = _doc("DeepSpeed ZeRO stage, 0-3.", 0)
    lr: float = _doc("AdamW learning rate (> 0).", 1e-4)
    weight_decay: float = _doc("AdamW weight decay (>= 0).", 0.0)
    grad_clip: float = _doc("Gradient-norm clip (> 0).", 1.0)
    micro_batch_size: int = _doc("Sequences per forward/backward on one learner.", 16)
    ppo_epochs: int = _doc("Passes over each rollout batch.", 1)
    mini_batches: int = _doc("Optimizer steps per PPO epoch (the batch is split into this many).", 1)
    backend: str = _doc(f"torch.distributed backend, one of {BACKENDS}: 'auto' = nccl on learners with GPUs, "
                        "gloo on CPU learners (derived from gpus_per_worker, not from the driver's machine).",
                        "auto")
    kl_chunk_size: int = _doc(
        "Tokens per chunk of every full-vocabulary computation (log-probs, entropy, exact KL): the "
        "logits exist for this many tokens at a time, so their memory is ~chunk * vocab, not B * T * vocab.", 4096)
    gradient_checkpointing: bool = _doc(
        "Recompute each decoder layer's activations in the backward (HF gradient checkpointing): "
        "activation memory ~1 hidden state per layer and token instead of ~30, for ~1/3 more compute.", False)
    max_tokens_per_micro_batch: int = _doc(
        "Token budget of a micro-batch (rows x padded length); rows are packed longest first. "
        "0 = split by micro_batch_size rows only (which also caps the rows when a budget is set).", 0)
    cpus_per_worker: float = _doc("CPU bundle per learner actor.", 1.0)
    gpus_per_worker: float = _doc("GPU bundle per learner actor (0 on CPU machines).", 0.0)
    node_resource: str = _doc(
        "Custom Ray resource that pins the learner actors to the nodes that have it ('' = anywhere); see "
        "rollout.node_resource.", "")


@dataclass(frozen=True)
class AlgorithmConfig:
    """PPO with a group baseline, and where/how the KL penalty enters."""

    kl_mode: str = _doc(f"Where the KL penalty goes: one of {KL_MODES}.", "none")
    kl_estimator: str = _doc(f"KL estimator: one of {KL_ESTIMATORS}.", "k1")
    kl_coef: float = _doc("KL coefficient beta (>= 0).", 0.05)
    kl_clamp: float = _doc("Clamp estimator values to +-this (0 disables; verl/OpenRLHF use 10). k3 needs it "
                           "unless allow_unclamped_k3.", 0.0)
    allow_unclamped_k3: bool = _doc(
        "Opt in to k3/k3_plus with kl_clamp = 0. Unclamped, k3 = e^{log r} - 1 - log r is 3.3e6 at log r = 15 "
        "and inf in float32 past log r = 88: one token then dominates (or NaNs) the update.", False)
    kl_importance_correction: bool = _doc(
        "Weight in-loss KL by pi/pi_old in the graph: k3 then gives the unbiased reverse-KL gradient "
        "(DeepSeek-V3.2 / Zhang et al. fix).", False)
    advantage: str = _doc(f"Advantage estimator: one of {ADVANTAGE_ESTIMATORS}.", "rloo")
    clip_eps: float = _doc("PPO clip range epsilon, in (0, 1).", 0.2)
    clip_eps_high: float = _doc("Upper clip epsilon (0 = same as clip_eps; DAPO's clip-higher).", 0.0)
    dual_clip: float = _doc("Dual-clip constant c > 1 for negative advantages (0 disables).", 0.0)
    loss_agg: str = _doc(f"Loss aggregation: one of {LOSS_AGGREGATIONS}.", "token-mean")
    grpo_eps: float = _doc("Epsilon added to the group std in GRPO.", 1e-6)


@dataclass(frozen=True)
class TaskConfig:
    """The RL task: prompts, rewards, splits."""

    name: str = _doc(f"Task: one of {TASKS}.", "palindrome")
    train_size: int = _doc("Training prompts generated/loaded.", 512)
    eval_size: int = _doc("Held-out evaluation prompts (disjoint from training).", 32)
    data_seed: int = _doc("Seed of the generated dataset and its split.", 1234)
    min_letters: int = _doc("Palindrome: fewest letters per prompt (>= 1).", 5)
    max_letters: int = _doc(
        "Palindrome: most letters per prompt (>= min_letters). 5-8 letters: 8.65 valid answers per prompt "
        "on average (at most 2, 6, 6, 24 for 5, 6, 7, 8 letters), room for the arms to differ.", 8)
    data_path: str = _doc("DeepScaleR: local .jsonl/.parquet file or hub dataset id.", "")
    instruction: str = _doc("Instruction text put before the question ('' = the task's default).", "")
    compact_prompt: bool = _doc(
        "Palindrome: give only the letters, not reasoning-gym's long wording (for tiny models).", True)
    format_reward: float = _doc("Reward for a well-formed but wrong answer (0 = off).", 0.0)
    prompts_per_step: int = _doc("Prompts per RL step (batch = prompts_per_step * n_samples).", 8)


@dataclass(frozen=True)
class RunConfig:
    """Length, seed and bookkeeping of one trial."""

    seed: int = _doc("Trial seed: sampling, prompt order, learner RNG.", 0)
    steps: int = _doc("RL steps per trial (>= 1).", 20)
    eval_every: int = _doc(
        "Evaluate pass@k and answer coverage on the eval split every this many steps, at the last step and "
        "at step 0 (pi_ref, computed once per study and seed, cached in the run dir); 0 = never.", 0)
    eval_n_samples: int = _doc(
        "Samples n per eval prompt: pass@k is logged for k = 1, 2, 4, ... up to n (and n itself).", 8)
    checkpoint_every: int = _doc(
        "Checkpoint every this many steps and at the last step; metrics reach MLflow at checkpoints "
        "(exactly once, docs/DESIGN.md), so 0 (never) writes them at the end of the trial only.", 0)
    samples_every: int = _doc("Log a table of sample completions every this many steps (0 = never).", 5)
    diversity_every: int = _doc("Compute embedding diversity every this many steps (0 = never).", 1)
    run_dir: str = _doc("Where runs, caches, checkpoints and the MLflow store live.", "runs")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    tracking_uri: str = _doc("MLflow tracking URI ('' = sqlite under run_dir).", "")
    experiment: str = _doc("MLflow experiment name ('' = the study's name).", "")


@dataclass(frozen=True)
class Config:
    """A whole trial: every setting klrl reads."""

    model: ModelConfig = _doc("Policy model.", factory=ModelConfig)
    rollout: RolloutConfig = _doc("vLLM rollouts.", factory=RolloutConfig)
    learner: LearnerConfig = _doc("DeepSpeed learner.", factory=LearnerConfig)
    algorithm: AlgorithmConfig = _doc("PPO, advantage and KL.", factory=AlgorithmConfig)
    task: TaskConfig = _doc("Task and data.", factory=TaskConfig)
    run: RunConfig = _doc("Trial length and bookkeeping.", factory=RunConfig)
    tracking: TrackingConfig = _doc("MLflow.", factory=TrackingConfig)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Config":
        """Build and validate a Config from a nested dict; raises ConfigError naming the field."""
        config = _build(cls, data or {}, prefix="")
        validate(config)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **dotted: Any) -> "Config":
        """A validated copy with dotted overrides, e.g. replace(**{"algorithm.kl_mode": "in_loss"})."""
        data = self.to_dict()
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return Config.from_dict(data)


def set_dotted(data: dict, dotted_key: str, value: Any) -> None:
    """Set data['a']['b'] = value for 'a.b'; unknown sections are caught later by from_dict."""
    *parents, leaf = dotted_key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted_key}: '{part}' is not a section")
    node[leaf] = value


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params and search-space axes."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def field_names(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf field name of a config dataclass."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names.extend(field_names(hints[f.name], f"{prefix}{f.name}."))
        else:
            names.append(f"{prefix}{f.name}")
    return names


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    for key in unknown:
        if f"{prefix}{key}" in REMOVED_KEYS:
            raise ConfigError(f"{prefix}{key}: {REMOVED_KEYS[prefix + key]}")
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key in '{where}'; allowed keys: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, dotted + ".")
        else:
            kwargs[name] = _coerce(hint, value, dotted)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    """Accept exactly the field's type; ints are accepted for floats, nothing else is converted."""
    if isinstance(hint, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - every field is one of the above
        ok = True
    if not ok:
        raise ConfigError(f"{dotted}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        # inf passes one-sided range checks (kl_coef >= 0), NaN passes fields that have none (tiny.sft_lr).
        raise ConfigError(f"{dotted}: must be a finite number, got {value}")
    return value


def _check(ok: bool, dotted: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{dotted}: {message}")


def _one_of(value: str, allowed: tuple[str, ...], dotted: str) -> None:
    _check(value in allowed, dotted, f"unknown value {value!r}; allowed: {list(allowed)}")


def validate(c: Config) -> None:
    """Cross-field and range checks; the first violation raises ConfigError naming the field."""
    _one_of(c.task.name, TASKS, "task.name")
    _one_of(c.model.dtype, DTYPES, "model.dtype")
    _validate_algorithm(c.algorithm)
    _validate_rollout(c.rollout, c.algorithm)
    _validate_learner(c.learner)
    for section, obj in (("rollout", c.rollout), ("learner", c.learner)):
        _check(obj.cpus_per_worker >= 0, f"{section}.cpus_per_worker", "must be >= 0")
        _check(obj.gpus_per_worker >= 0, f"{section}.gpus_per_worker", "must be >= 0")
    _validate_task(c)
    _validate_run(c.run)
    tiny = c.model.tiny
    _check(tiny.hidden_size % tiny.num_heads == 0, "model.tiny.num_heads",
           f"must divide model.tiny.hidden_size ({tiny.hidden_size}), got {tiny.num_heads}")
    _check(tiny.num_heads % tiny.num_kv_heads == 0, "model.tiny.num_kv_heads",
           f"must divide model.tiny.num_heads ({tiny.num_heads}), got {tiny.num_kv_heads}")
    _check(tiny.sft_steps >= 1, "model.tiny.sft_steps", f"must be >= 1, got {tiny.sft_steps}")
    _check(0.0 <= tiny.sft_target_accuracy < 1.0, "model.tiny.sft_target_accuracy",
           f"must be in [0, 1) (0 = no calibration), got {tiny.sft_target_accuracy}")
    _check(c.model.path != "", "model.path", "must be 'tiny' or a model folder / hub id")


def _validate_algorithm(a: AlgorithmConfig) -> None:
    _one_of(a.kl_mode, KL_MODES, "algorithm.kl_mode")
    _one_of(a.kl_estimator, KL_ESTIMATORS, "algorithm.kl_estimator")
    _one_of(a.advantage, ADVANTAGE_ESTIMATORS, "algorithm.advantage")
    _one_of(a.loss_agg, LOSS_AGGREGATIONS, "algorithm.loss_agg")
    _check(a.kl_coef >= 0, "algorithm.kl_coef", f"must be >= 0, got {a.kl_coef}")
    _check(a.kl_clamp >= 0, "algorithm.kl_clamp", f"must be >= 0 (0 disables), got {a.kl_clamp}")
    _check(0 < a.clip_eps < 1, "algorithm.clip_eps", f"must be in (0, 1), got {a.clip_eps}")
    _check(a.clip_eps_high == 0 or 0 < a.clip_eps_high < 1, "algorithm.clip_eps_high",
           f"must be 0 (same as clip_eps) or in (0, 1), got {a.clip_eps_high}")
    _check(a.dual_clip == 0 or a.dual_clip > 1, "algorithm.dual_clip",
           f"must be 0 (off) or > 1, got {a.dual_clip}")
    _check(a.grpo_eps > 0, "algorithm.grpo_eps", f"must be > 0, got {a.grpo_eps}")
    if a.kl_mode == "in_reward":
        _check(a.kl_estimator != "k3_plus", "algorithm.kl_estimator",
               "k3_plus only changes the gradient of a loss term; with kl_mode=in_reward use k1, k2, k3 "
               "or exact_*")
    uses_k3 = a.kl_mode != "none" and a.kl_estimator in ("k3", "k3_plus")
    _check(not uses_k3 or a.kl_clamp > 0 or a.allow_unclamped_k3, "algorithm.kl_clamp",
           f"{a.kl_estimator} with kl_mode={a.kl_mode} needs a clamp: set algorithm.kl_clamp: 10 (as verl) or opt "
           "in with algorithm.allow_unclamped_k3: true. Unclamped, k3 = e^{log r} - 1 - log r is 3.3e6 at "
           "log r = 15 and overflows float32 past log r = 88, so one token dominates (or NaNs) the update")


def _validate_rollout(r: RolloutConfig, a: AlgorithmConfig) -> None:
    _one_of(r.weight_sync, WEIGHT_SYNCS, "rollout.weight_sync")
    _check_node_resource(r.node_resource, "rollout.node_resource")
    min_group = 2 if a.advantage in ("rloo", "grpo") else 1
    _check(r.n_samples >= min_group, "rollout.n_samples",
           f"must be >= {min_group} for advantage={a.advantage!r} (a group baseline needs 2+ samples), "
           f"got {r.n_samples}")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(r.top_p == 1, "rollout.top_p",
           f"must be 1.0, got {r.top_p}: the learner scores tokens under the full softmax and applies no "
           "nucleus mask, so with top_p < 1 pi_old would not be the sampling distribution (PPO ratios and "
           "KL estimates would be biased)")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    _check(r.max_model_len > r.max_new_tokens, "rollout.max_model_len",
           f"must exceed rollout.max_new_tokens ({r.max_new_tokens}), got {r.max_model_len}")
    _check(r.kv_cache_space_gib >= 1, "rollout.kv_cache_space_gib", f"must be >= 1, got {r.kv_cache_space_gib}")
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
           f"must be in (0, 1], got {r.gpu_memory_utilization}")
    _check(r.num_workers >= 1, "rollout.num_workers", f"must be >= 1, got {r.num_workers}")
    _check(r.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
           f"must be 1, got {r.tensor_parallel_size}: a klrl rollout actor holds one GPU and runs one vLLM "
           "engine in-process (no multi-GPU executor); for more rollout throughput raise rollout.num_workers "
           "(one engine per GPU, each step's prompts split across them)")


# Resources Ray itself accounts for: a node-pinning resource must be a custom one.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_node_resource(name: str, path: str) -> None:
    _check(name == "" or (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", name) is not None
                          and name not in RAY_BUILTIN_RESOURCES), path,
           f"must be '' or a custom Ray resource name (letters, digits, _ . : -; not one of "
           f"{RAY_BUILTIN_RESOURCES}), got {name!r}")


def _validate_learner(lrn: LearnerConfig) -> None:
    _one_of(lrn.backend, BACKENDS, "learner.backend")
    _check_node_resource(lrn.node_resource, "learner.node_resource")
    _check(lrn.zero_stage in (0, 1, 2, 3), "learner.zero_stage", f"must be one of [0, 1, 2, 3], got {lrn.zero_stage}")
    _check(lrn.lr > 0, "learner.lr", f"must be > 0, got {lrn.lr}")
    _check(lrn.weight_decay >= 0, "learner.weight_decay", f"must be >= 0, got {lrn.weight_decay}")
    _check(lrn.grad_clip > 0, "learner.grad_clip", f"must be > 0, got {lrn.grad_clip}")
    for name in ("num_workers", "micro_batch_size", "ppo_epochs", "mini_batches", "kl_chunk_size"):
        _check(getattr(lrn, name) >= 1, f"learner.{name}", f"must be >= 1, got {getattr(lrn, name)}")
    _check(lrn.max_tokens_per_micro_batch >= 0, "learner.max_tokens_per_micro_batch",
           f"must be >= 0 (0 = no token budget), got {lrn.max_tokens_per_micro_batch}")


# Most sequences one generate call may sample (a step's prompts_per_step * n_samples, an eval's
# eval_size * eval_n_samples): 2^20 is 128x DAPO's step (512 prompts x 16 samples), and at ~1e5 generated
# tokens/s a step of 2^20 thousand-token responses takes ~3 hours. Larger is a typo (n_samples: 10**6).
MAX_SEQUENCES = 2**20


def _validate_task(c: Config) -> None:
    t, r, lrn = c.task, c.rollout, c.learner
    batch = t.prompts_per_step * r.n_samples
    bigger = "rollout.n_samples" if r.n_samples >= t.prompts_per_step else "task.prompts_per_step"
    _check(batch <= MAX_SEQUENCES, bigger,
           f"a step of task.prompts_per_step x rollout.n_samples = {batch:,} sequences is more than {MAX_SEQUENCES:,} "
           "(128x DAPO's 512 x 16; hours per step)")
    evals = t.eval_size * c.run.eval_n_samples
    _check(evals <= MAX_SEQUENCES, "run.eval_n_samples" if c.run.eval_n_samples >= t.eval_size else "task.eval_size",
           f"an eval of task.eval_size x run.eval_n_samples = {evals:,} sequences is more than {MAX_SEQUENCES:,}")
    per_update = lrn.num_workers * lrn.mini_batches
    _check(batch % per_update == 0, "learner.num_workers",
           f"batch of {batch} sequences (task.prompts_per_step * rollout.n_samples) must split evenly over "
           f"learner.num_workers * learner.mini_batches = {per_update}")
    _check(t.prompts_per_step >= 1, "task.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    _check(t.train_size >= t.prompts_per_step, "task.train_size",
           f"must be >= task.prompts_per_step ({t.prompts_per_step}), got {t.train_size}")
    _check(t.eval_size >= 0, "task.eval_size", f"must be >= 0, got {t.eval_size}")
    _check(t.min_letters >= 1, "task.min_letters", f"must be >= 1, got {t.min_letters}")
    _check(t.max_letters >= t.min_letters, "task.max_letters",
           f"must be >= task.min_letters ({t.min_letters}), got {t.max_letters}")
    _check(t.format_reward >= 0, "task.format_reward", f"must be >= 0, got {t.format_reward}")
    _check(t.name != "deepscaler" or t.data_path != "", "task.data_path",
           "required for task.name='deepscaler' (a .jsonl/.parquet file or a hub dataset id)")


def _validate_run(run: RunConfig) -> None:
    _check(run.steps >= 1, "run.steps", f"must be >= 1, got {run.steps}")
    for name in ("eval_every", "checkpoint_every", "samples_every", "diversity_every"):
        _check(getattr(run, name) >= 0, f"run.{name}", f"must be >= 0 (0 = never), got {getattr(run, name)}")
    _check(run.eval_n_samples >= 1, "run.eval_n_samples", f"must be >= 1, got {run.eval_n_samples}")
    _check(run.run_dir != "", "run.run_dir", "must not be empty")


# In the reward a KL term reaches the policy only through the score function, E[kl * grad log pi(y)]; for
# the reverse KL that is the whole gradient only when the per-token term is log pi - log pi_ref (k1): every
# other estimator depends on pi itself, and the part of its gradient through pi is dropped (SCIENCE.md;
# Shah et al., arXiv 2512.21852). exact_forward is not a reverse-KL estimate at all.
BIASED_IN_REWARD = ("k2", "k3", "exact_reverse", "exact_forward")


def advisories(c: Config) -> list[str]:
    """Legal settings a user should know are questionable, as 'field: message' (printed as warnings)."""
    a = c.algorithm
    if a.kl_mode == "in_reward" and a.kl_estimator in BIASED_IN_REWARD:
        return [f"algorithm.kl_estimator: {a.kl_estimator} in the reward gives a biased gradient of "
                "KL(pi || pi_ref): a reward carries only the score-function term, which is the reverse-KL "
                "gradient for k1 alone; kept for comparison, but not an unbiased reverse-KL arm"]
    return []
