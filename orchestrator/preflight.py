"""Checks of a study against the model it trains and the machine it runs on, before any trial starts.

`core.config.validate` sees one config and nothing else. These checks also read the model's shape (the
tiny model's config fields, or `config.json` of a local folder or of a hub id already in the Hugging Face
cache; nothing is downloaded) and this machine's memory, so that a study that cannot run fails in a
second at `klrl validate` / `klrl run` instead of inside every trial minutes later:
  - `rollout.max_model_len` against the model's `max_position_embeddings` (vLLM refuses to start past it);
  - the longest prompt + `rollout.max_new_tokens` against `rollout.max_model_len` (exact for the tiny
    policy, whose tokenizer is one token per byte; for other models the rollout actor checks it on the
    first batch, see workers/rollout.py);
  - sizes against host memory: the train/eval splits, a step's and an eval's batch, the warm-start set;
  - the KV cache: one sequence of `max_model_len` tokens must fit the cache vLLM is given (else vLLM
    refuses to start); a step whose sequences do not all fit runs in waves (a warning, not an error).
Machine figures are this machine's (the driver's): on a cluster the trials run on worker nodes, and these
estimates only refuse what no node of this size could hold.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from core.config import Config, ConfigError, ModelConfig, TinyModelConfig

GIB = 2**30
# Host bytes per example of a train/eval split: 0.9 KB (compact) to 1.3 KB (reasoning-gym's wording) per
# palindrome Example with its metadata, measured with tracemalloc over 20,000 examples, plus the formatted
# prompt string the trial keeps beside each one.
EXAMPLE_BYTES = 2048
# Host bytes per token of a step's padded (B, T) batch: RolloutBatch ~22 B (two int64 id tensors, two bool
# masks, float32 sampler log-probs), TokenScores 20 B (five float32 tensors), 8 B of advantages and old
# log-probs; the trial process holds it and Ray's object store copies it to the actors: ~100 B, rounded up.
BATCH_BYTES_PER_TOKEN = 128
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TINY_VOCAB = 266  # tasks/tiny_model.py: 6 special + 4 tag tokens + 256 bytes


@dataclass(frozen=True)
class ModelShape:
    """What the checks need of a model: its length limit and the sizes of its KV cache and weights."""

    max_position_embeddings: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    params: int  # estimate, for the GPU memory left to the KV cache
    source: str  # where the numbers come from, for the error message

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Keys and values of every layer for one token, in bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class Machine:
    """The memory a trial may use: host RAM, and GPU memory per device when this machine has a GPU."""

    memory_bytes: int
    gpu_memory_bytes: int | None = None

    @classmethod
    def here(cls) -> "Machine":
        return cls(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), _gpu_memory())


def _gpu_memory() -> int | None:
    """Memory of GPU 0 from nvidia-smi, or None without one (torch is not imported: it costs seconds)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def tiny_shape(tiny: TinyModelConfig) -> ModelShape:
    h, layers = tiny.hidden_size, tiny.num_layers
    head_dim = h // tiny.num_heads
    per_layer = 2 * h * h + 2 * h * tiny.num_kv_heads * head_dim + 3 * h * tiny.intermediate_size
    return ModelShape(tiny.max_position_embeddings, layers, tiny.num_kv_heads, head_dim,
                      2 * TINY_VOCAB * h + layers * per_layer, "model.tiny.max_position_embeddings")


def model_shape(model: ModelConfig) -> ModelShape | None:
    """The model's shape if its config is on this machine: the tiny model, a local folder, a cached hub id."""
    if model.path == "tiny":
        return tiny_shape(model.tiny)
    found = local_config_json(model.path)
    if found is None:
        return None
    try:
        cfg = json.loads(found.read_text())
        heads, h, layers = cfg["num_attention_heads"], cfg["hidden_size"], cfg["num_hidden_layers"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or h // heads
        per_layer = 2 * h * h + 2 * h * kv_heads * head_dim + 3 * h * cfg.get("intermediate_size", 4 * h)
        embed = cfg.get("vocab_size", 0) * h * (1 if cfg.get("tie_word_embeddings") else 2)
        return ModelShape(int(cfg["max_position_embeddings"]), layers, kv_heads, head_dim,
                          embed + layers * per_layer, f"max_position_embeddings in {found}")
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None  # not a config these checks understand: the engines will say what is wrong


def local_config_json(path: str) -> Path | None:
    """config.json of a local model folder, or of a hub id ('org/name') in a Hugging Face cache here."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return folder / "config.json"
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return None
    for hub in _hub_caches():
        repo = hub / f"models--{path.replace('/', '--')}"
        ref = repo / "refs" / "main"
        snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
        snapshots += sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        for snapshot in snapshots:
            if (snapshot / "config.json").is_file():
                return snapshot / "config.json"
    return None


def _hub_caches() -> list[Path]:
    """Where the trials' engines look for hub models: the user's HF cache settings, else klrl's run dir cache."""
    from workers import environment

    env = os.environ
    candidates = [env.get("HF_HUB_CACHE"), env.get("HF_HOME") and Path(env["HF_HOME"]) / "hub",
                  Path(environment.cache_env(environment.run_dir())["HF_HOME"]) / "hub",
                  Path.home() / ".cache" / "huggingface" / "hub"]
    return [Path(c) for c in candidates if c]


def tiny_token_count(text: str) -> int:
    """Tokens of `text` under the tiny policy's tokenizer: one per special/tag token, one per other byte."""
    from tasks.tiny_model import SPECIAL_TOKENS, TAG_TOKENS

    pattern = "|".join(re.escape(t) for t in (*SPECIAL_TOKENS, *TAG_TOKENS))
    specials = len(re.findall(pattern, text))
    return specials + len(re.sub(pattern, "", text).encode())


def longest_prompt_tokens(config: Config) -> int | None:
    """Tokens of the task's longest prompt where that is exact without loading data or tokenizers: the tiny
    policy on palindromes (every prompt with task.max_letters letters has the same length). Else None."""
    if config.model.path != "tiny" or config.task.name != "palindrome":
        return None
    import jinja2

    from tasks.palindrome import FULL_INSTRUCTION, question_for
    from tasks.prompts import resolve_instruction, user_message
    from tasks.tiny_model import CHAT_TEMPLATE

    t = config.task
    letters = [chr(ord("a") + i % 26) for i in range(t.max_letters)]
    instruction = resolve_instruction(t.instruction, "" if t.compact_prompt else FULL_INSTRUCTION)
    message = {"role": "user", "content": user_message(instruction, question_for(letters, t.compact_prompt))}
    prompt = jinja2.Template(CHAT_TEMPLATE).render(messages=[message], add_generation_prompt=True)
    return tiny_token_count(prompt)


def check_config(config: Config, machine: Machine) -> list[str]:
    """Raise ConfigError('field: message') for what this model or machine cannot run; return warnings."""
    shape = model_shape(config.model)
    if shape is not None:
        _check_lengths(config, shape)
    _check_host_memory(config, machine)
    return _check_kv_cache(config, shape, machine) if shape is not None else []


def _check_lengths(config: Config, shape: ModelShape) -> None:
    r = config.rollout
    if r.max_model_len > shape.max_position_embeddings:
        raise ConfigError(f"rollout.max_model_len: {r.max_model_len} exceeds the model's "
                          f"{shape.max_position_embeddings} ({shape.source}); vLLM would refuse to start")
    prompt = longest_prompt_tokens(config)
    if prompt is not None and prompt + r.max_new_tokens > r.max_model_len:
        raise ConfigError(f"rollout.max_model_len: the longest prompt ({prompt} tokens, task.max_letters="
                          f"{config.task.max_letters}) plus rollout.max_new_tokens ({r.max_new_tokens}) is "
                          f"{prompt + r.max_new_tokens} tokens, more than rollout.max_model_len ({r.max_model_len}): "
                          "responses would be cut short; raise max_model_len or lower max_new_tokens")


def _check_host_memory(config: Config, machine: Machine) -> None:
    """Each thing a trial holds in host memory must fit this machine (the numbers: see the constants)."""
    t, r, run = config.task, config.rollout, config.run
    step_rows, eval_rows = t.prompts_per_step * r.n_samples, t.eval_size * run.eval_n_samples
    needs = [  # (field to name, bytes, what it is)
        ("task.train_size" if t.train_size >= t.eval_size else "task.eval_size",
         (t.train_size + t.eval_size) * EXAMPLE_BYTES, f"the train and eval splits ({t.train_size + t.eval_size:,} "
                                                        f"prompts at ~{EXAMPLE_BYTES} B each)"),
        ("rollout.n_samples" if r.n_samples >= t.prompts_per_step else "task.prompts_per_step",
         step_rows * r.max_model_len * BATCH_BYTES_PER_TOKEN,
         f"a step's batch (task.prompts_per_step x rollout.n_samples = {step_rows:,} sequences of up to "
         f"rollout.max_model_len = {r.max_model_len} tokens, ~{BATCH_BYTES_PER_TOKEN} B per token)"),
        ("run.eval_n_samples" if run.eval_n_samples >= t.eval_size else "task.eval_size",
         eval_rows * r.max_model_len * BATCH_BYTES_PER_TOKEN if run.eval_every else 0,
         f"an eval batch (task.eval_size x run.eval_n_samples = {eval_rows:,} sequences of up to "
         f"{r.max_model_len} tokens)"),
    ]
    if config.model.path == "tiny":
        needs.append(("model.tiny.sft_examples", config.model.tiny.sft_examples * EXAMPLE_BYTES,
                      f"the warm-start set ({config.model.tiny.sft_examples:,} examples)"))
    for field, need, what in needs:
        if need > machine.memory_bytes:
            raise ConfigError(f"{field}: {what} would take ~{need / GIB:,.1f} GiB of host memory, more than this "
                              f"machine's {machine.memory_bytes / GIB:,.1f} GiB")


def _check_kv_cache(config: Config, shape: ModelShape, machine: Machine) -> list[str]:
    """One max_model_len sequence must fit the KV cache (an error); the whole step should (a warning)."""
    r = config.rollout
    per_seq = shape.kv_bytes_per_token(config.model.dtype) * r.max_model_len
    if r.gpus_per_worker > 0:
        if machine.gpu_memory_bytes is None:
            return []  # a GPU-less driver: vLLM checks its own budget when the actor starts
        weights = shape.params * DTYPE_BYTES[config.model.dtype]
        budget, field = r.gpu_memory_utilization * machine.gpu_memory_bytes - weights, "rollout.gpu_memory_utilization"
        what = (f"rollout.gpu_memory_utilization ({r.gpu_memory_utilization}) x {machine.gpu_memory_bytes / GIB:.0f} "
                f"GiB of GPU memory, less ~{weights / GIB:.1f} GiB of weights")
    else:
        engines = r.kv_cache_space_gib * r.num_workers * GIB
        if engines > machine.memory_bytes:
            raise ConfigError(f"rollout.kv_cache_space_gib: {r.kv_cache_space_gib} GiB of KV cache per rollout actor x "
                              f"rollout.num_workers ({r.num_workers}) is more than this machine's "
                              f"{machine.memory_bytes / GIB:,.1f} GiB of memory")
        budget, field = r.kv_cache_space_gib * GIB, "rollout.kv_cache_space_gib"
        what = f"rollout.kv_cache_space_gib ({r.kv_cache_space_gib} GiB)"
    if per_seq > budget:
        raise ConfigError(f"{field}: one sequence of rollout.max_model_len = {r.max_model_len} tokens needs "
                          f"{per_seq / GIB:.2f} GiB of KV cache, more than {what} leaves ({max(budget, 0) / GIB:.2f} "
                          "GiB); vLLM would refuse to start")
    rows = max(config.task.prompts_per_step * r.n_samples,
               config.task.eval_size * config.run.eval_n_samples if config.run.eval_every else 0)
    per_engine = math.ceil(rows / r.num_workers)
    fits = int(budget // per_seq)
    if per_engine > fits:
        return [f"{field}: the KV cache holds {fits} of the {per_engine} sequences each rollout actor samples at once "
                f"(at rollout.max_model_len = {r.max_model_len} tokens), so vLLM runs them in up to "
                f"{math.ceil(per_engine / fits)} waves (slower rollouts, same results)"]
    return []


def check_study(study, machine: Machine | None = None) -> tuple[str, ...]:
    """Check every trial config of a study; SpecError names the file (or `--set`) and the field. Returns the
    warnings as 'source: field: message' lines."""
    from orchestrator.config_io import SpecError, error_field

    machine = machine or Machine.here()
    warnings: list[str] = []
    for labels, sampled in study.points():
        try:
            found = check_config(study.trial_config(labels, sampled), machine)
        except ConfigError as exc:
            raise SpecError(f"{_source(study, labels, sampled, error_field(exc), machine)}: {exc}") from None
        for warning in found:
            line = f"{_source(study, labels, sampled, error_field(warning), machine)}: {warning}"
            if line not in warnings:
                warnings.append(line)
    return tuple(warnings)


def _source(study, labels: dict, sampled: dict, field: str, machine: Machine) -> str:
    """`--set KEY=VALUE` when the file alone has no such problem, else 'file: where'."""
    from orchestrator.config_io import set_source

    if study.overrides and field not in _complaints(study.from_file_only().trial_config(labels, sampled), machine):
        return set_source(study.overrides, field)
    return f"{study.path}: {_where(study, labels, sampled, field, machine)}"


def _where(study, labels: dict, sampled: dict, field: str, machine: Machine) -> str:
    """The grid value or Optuna range that sets `field`; else 'base' when the base config alone has the
    problem; else the grid point whose combination does."""
    if study.setter_of(field) is None and field in _complaints(Config.from_dict(study.base), machine):
        return "base"
    return study.locate(labels, sampled, field)


def _complaints(config: Config, machine: Machine) -> set[str]:
    """The fields check_config names for `config` (its error, or its warnings)."""
    from orchestrator.config_io import error_field

    try:
        return {error_field(w) for w in check_config(config, machine)}
    except ConfigError as exc:
        return {error_field(exc)}
