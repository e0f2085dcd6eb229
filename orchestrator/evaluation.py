"""Coverage evaluation on the eval split: did RL narrow what the policy can produce?

n = `run.eval_n_samples` samples per eval prompt. A sample is correct when it earns the full reward, and
then its answer, normalised as the task's scorer normalises it, is a valid answer
(`Task.valid_answer`). From them: pass@k for k = 1, 2, 4, ..., n (unbiased estimator), and the answer
coverage, novelty and entropy of the policy's valid answers against pi_ref's (Yue et al. 2025, "Does
Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs Beyond the Base Model?",
arXiv 2504.13837), all from `core.diversity`. Logged at step 0 (pi_ref itself), every `run.eval_every`
steps and at the last step.

pi_ref's answers are sampled once per study and seed: the first trial that needs them samples them
(its engines are at pi_ref when it starts) and caches them as JSON in the run dir, keyed by everything
they depend on; every other trial of the study only reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.diversity import coverage_metrics, pass_at_k_metrics
from core.types import Rollout

CACHE_FORMAT = 1
EVAL_SEED_OFFSET = 7919  # eval draws other sample streams than the training step of the same number


def eval_seed(config: Config, step: int) -> int:
    return (config.run.seed * 1_000_003 + step + EVAL_SEED_OFFSET) % (2**31 - 1)


def sample_answers(rollout: Rollout, task, prompts: list[str], n: int, seed: int) -> tuple[list, list[float]]:
    """(valid answers: P lists of n answers or None, rewards: P * n floats) of n samples per eval prompt."""
    batch = rollout.generate(prompts, n, seed=seed)
    examples = [task.eval[int(g)] for g in batch.group_index.tolist()]
    answers = task.valid_answers(batch.response_texts, examples)
    rewards = [task.reward(text, ex) for text, ex in zip(batch.response_texts, examples)]
    return [answers[p * n:(p + 1) * n] for p in range(len(prompts))], rewards


def coverage(answers: list[list[str | None]], reference: list[list[str | None]], rewards: list[float]) -> dict:
    """Every eval metric of one evaluation, keys `eval/...` (pass@k as eval/pass_at_{k})."""
    correct = np.array([[a is not None for a in row] for row in answers])  # (P, n) bool
    out = pass_at_k_metrics(correct)  # k = 1, 2, 4, ..., n
    out.update(coverage_metrics(answers, reference))
    out["eval/reward_mean"] = float(np.mean(rewards))
    return out


def evaluate(rollout: Rollout, task, prompts: list[str], config: Config, step: int,
             reference: list[list[str | None]]) -> dict[str, float]:
    """The policy's eval metrics at `step` against pi_ref's answers, with `time/eval_s`."""
    start = time.perf_counter()
    answers, rewards = sample_answers(rollout, task, prompts, config.run.eval_n_samples, eval_seed(config, step))
    return {**coverage(answers, reference, rewards), "time/eval_s": time.perf_counter() - start}


# ---- pi_ref's answers, once per study and seed ----------------------------------------------------------

def _folder_fingerprint(folder: Path) -> list:
    """Names, sizes and modification times of a model folder's files: a changed model, another key."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


def reference_key(model_path: Path, config: Config) -> dict[str, Any]:
    """Everything pi_ref's eval answers depend on."""
    r = config.rollout
    return {"format": CACHE_FORMAT, "model_path": str(model_path), "model": _folder_fingerprint(model_path),
            "dtype": config.model.dtype, "task": config.to_dict()["task"], "n": config.run.eval_n_samples,
            "seed": eval_seed(config, 0), "sampling": [r.temperature, r.top_p, r.max_new_tokens, r.max_model_len]}


def reference_answers(rollout: Rollout, task, prompts: list[str], model_path: Path, config: Config,
                      cache_dir: Path) -> tuple[list[list[str | None]], dict[str, float]]:
    """(pi_ref's valid answers per eval prompt, its eval metrics for step 0), read from the cache or sampled.

    Sampling needs `rollout` at pi_ref, as it is right after its start or reset. The cache file is written
    atomically (a rename), so concurrent trials of one study at worst sample it twice, never read half.
    """
    key = reference_key(model_path, config)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"pi_ref_eval-{digest}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        return cached["answers"], cached["metrics"]
    answers, rewards = sample_answers(rollout, task, prompts, config.run.eval_n_samples, eval_seed(config, 0))
    metrics = coverage(answers, answers, rewards)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({"key": key, "answers": answers, "metrics": metrics}))
    partial.replace(path)
    return answers, metrics
