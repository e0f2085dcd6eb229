"""One klrl trial: `run.steps` RL steps of named, timed stages, their metrics, evaluation and checkpoints.

`rl_step` is the whole RL step on one screen (docs/DESIGN.md, "One RL step"). The engines are the
`Rollout` and `Learner` of core/types.py: this module never sees Ray, vLLM, DeepSpeed or Hugging Face
(orchestrator/trainable.py builds the engines and hands them in). The loop never branches on estimator
or advantage names: `core.kl` and `core.advantages` look them up in their registries. The one branch is
`kl_mode`, the study's independent variable: it decides whether the KL goes into the reward (here) or
the loss (the learner).

Steps count from 1: step s is the s-th update, and its metrics are logged at MLflow step s; step 0 is
the evaluation of pi_ref. Prompt order and sampling seeds are pure functions of (run.seed, step), so the
step number is the whole "RNG / prompt cursor" a checkpoint needs.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from core.advantages import compute_advantages
from core.config import AlgorithmConfig, Config
from core.diversity import diversity_metrics
from core.kl import token_kl_penalty
from core.metrics import kl_metrics, offpolicy_metrics, rollout_metrics
from core.types import Learner, Rollout, RolloutBatch, TokenScores, TrainBatch
from orchestrator import evaluation

if TYPE_CHECKING:
    from orchestrator.checkpoint import CheckpointStore, Ledger

SAMPLE_ROWS = 16  # rows in each logged sample-completions table
# A NaN or inf in any of these stops the trial (NonFiniteMetric): its numbers mean nothing after it.
FINITE_PREFIXES = ("loss/", "kl/", "reward/", "learner/grad_norm")


class NonFiniteMetric(RuntimeError):
    """A loss, gradient norm, KL or reward went NaN/inf: deterministic, so the trial fails for good."""

    def __init__(self, step: int, key: str, value: float):
        super().__init__(f"step {step}: {key} is {value} (non-finite); the trial stops here, its numbers would "
                         "mean nothing after it")
        self.step, self.key = step, key


class StageTimer:
    """`with timer("rollout"): ...` records wall seconds per stage as `time/<stage>_s`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{stage}_s": s for stage, s in self.seconds.items()}


@dataclass
class Trial:
    """Everything a step needs, built once per trial."""

    config: Config
    task: Any  # tasks.base.Task
    prompts: list[str]  # formatted train prompts, aligned with task.train
    eval_prompts: list[str]  # formatted eval prompts, aligned with task.eval
    rollout: Rollout
    learner: Learner
    embed: Callable[[list[str]], np.ndarray] | None = None  # texts -> (B, D) embeddings, for diversity
    reference_answers: list | None = None  # pi_ref's valid answers per eval prompt (evaluation.py)
    last: dict = field(default_factory=dict)  # the latest step's batch and rewards (for sample tables)

    def step_examples(self, step: int) -> tuple[list[str], list]:
        """Step's prompts (step >= 1): a fresh seeded permutation of the train split per epoch."""
        n, per = len(self.task.train), self.config.task.prompts_per_step
        picked = []
        for i in range((step - 1) * per, step * per):
            epoch, pos = divmod(i, n)
            order = np.random.default_rng([self.config.run.seed, epoch]).permutation(n)
            picked.append(int(order[pos]))
        return [self.prompts[i] for i in picked], [self.task.train[i] for i in picked]


def rl_step(trial: Trial, step: int) -> dict[str, float]:
    """One RL step: rollout -> reward -> reference -> advantage -> update -> sync -> metrics."""
    cfg, timer = trial.config, StageTimer()
    prompts, examples = trial.step_examples(step)
    with timer("rollout"):
        batch = trial.rollout.generate(prompts, cfg.rollout.n_samples, seed=sampling_seed(cfg, step))
    with timer("reward"):
        rewards = score_rewards(trial.task, batch, examples)
    with timer("reference"):
        scores = trial.learner.score(batch)
    with timer("advantage"):
        advantages = kl_shaped_advantages(cfg.algorithm, batch, scores, rewards)
    with timer("update"):
        update = trial.learner.update(TrainBatch(batch, scores.logprobs, scores.ref_logprobs, advantages))
    with timer("sync"):
        trial.learner.sync_weights_to(trial.rollout)
    with timer("metrics"):
        metrics = step_metrics(trial, step, batch, examples, scores, rewards, update)
    trial.last = {"batch": batch, "rewards": rewards}
    return {**metrics, **timer.metrics(), **throughput(batch, timer)}


def score_rewards(task, batch: RolloutBatch, examples: list) -> torch.Tensor:
    """(B,) float32 task rewards; row b answers examples[group_index[b]]."""
    groups = batch.group_index.tolist()
    return torch.tensor([task.reward(text, examples[g]) for text, g in zip(batch.response_texts, groups)],
                        dtype=torch.float32)


def kl_shaped_advantages(algo: AlgorithmConfig, batch: RolloutBatch, scores: TokenScores,
                         rewards: torch.Tensor) -> torch.Tensor:
    """(B, T) advantages; with kl_mode=in_reward the per-token KL penalty is folded in as reward-to-go."""
    penalty = token_kl_penalty(scores, algo.kl_estimator, algo.kl_clamp) if algo.kl_mode == "in_reward" else None
    return compute_advantages(algo.advantage, rewards, batch.group_index, batch.response_mask,
                              kl_penalty=penalty, kl_coef=algo.kl_coef, eps=algo.grpo_eps)


def step_metrics(trial: Trial, step: int, batch: RolloutBatch, examples: list, scores: TokenScores,
                 rewards: torch.Tensor, update: dict[str, float]) -> dict[str, float]:
    """Every per-step metric (section/name keys); diversity only every run.diversity_every steps."""
    out = {**rollout_metrics(batch, rewards), **kl_metrics(scores, batch.response_mask),
           **offpolicy_metrics(batch, scores), **update}
    if due(step, trial.config.run.diversity_every, trial.config.run.steps):
        out.update(diversity(trial, batch, examples))
    return out


def diversity(trial: Trial, batch: RolloutBatch, examples: list) -> dict[str, float]:
    """Distinct (valid) answers, distinct-n and embedding similarity within each prompt's group."""
    task, texts = trial.task, batch.response_texts
    valid = task.valid_answers(texts, [examples[g] for g in batch.group_index.tolist()])
    answers = [task.normalized_answer(text) for text in texts]  # of any validity, normalised as valid ones are
    embeddings = trial.embed(batch.response_texts) if trial.embed is not None else None
    return diversity_metrics(batch.response_texts, answers, [v is not None for v in valid], batch.group_index,
                             embeddings=embeddings)


def evaluate(trial: Trial, step: int) -> dict[str, float]:
    """Coverage evaluation of the current policy against pi_ref (orchestrator/evaluation.py)."""
    if not trial.eval_prompts or trial.reference_answers is None:
        return {}
    return evaluation.evaluate(trial.rollout, trial.task, trial.eval_prompts, trial.config, step,
                               trial.reference_answers)


def throughput(batch: RolloutBatch, timer: StageTimer) -> dict[str, float]:
    total = sum(timer.seconds.values())
    tokens = int(batch.response_mask.sum())
    return {"time/step_s": total, "perf/tokens_per_s": tokens / total if total > 0 else 0.0,
            "perf/response_tokens": float(tokens)}


def sample_rows(trial: Trial, step: int) -> list[dict]:
    batch, rewards = trial.last["batch"], trial.last["rewards"]
    return [{"step": step, "group": int(batch.group_index[i]), "prompt": batch.prompt_texts[i],
             "response": batch.response_texts[i], "reward": float(rewards[i])}
            for i in range(min(SAMPLE_ROWS, batch.batch_size))]


def sampling_seed(cfg: Config, step: int) -> int:
    return (cfg.run.seed * 1_000_003 + step) % (2**31 - 1)


def due(step: int, every: int, steps: int) -> bool:
    """True on every `every`-th step (steps count from 1) and on the last one; never when every == 0."""
    return every > 0 and (step % every == 0 or step == steps)


def check_finite(metrics: dict[str, float], step: int) -> None:
    """Raise NonFiniteMetric naming the first non-finite loss, gradient norm, KL or reward of the step."""
    for key in sorted(metrics):
        if key.startswith(FINITE_PREFIXES) and not math.isfinite(metrics[key]):
            raise NonFiniteMetric(step, key, metrics[key])


# ---- the loop ------------------------------------------------------------------------------------------

def run_steps(trial: Trial, first: int, ledger: "Ledger", store: "CheckpointStore | None",
              report: Callable[[int, dict[str, float]], None], startup: dict[str, float]) -> None:
    """Steps first..run.steps: each step's metrics go to the ledger (MLflow at checkpoints, exactly once)
    and to `report` (Tune); checkpoints every run.checkpoint_every steps and at the last step. `startup`
    (this start's `time/startup_s`, ...) goes with the first step this start computes."""
    run, tracker, run_id = trial.config.run, ledger.tracker, ledger.run_id
    once = dict(startup)
    track_s = 0.0
    for step in range(first, run.steps + 1):
        metrics = rl_step(trial, step)
        if due(step, run.eval_every, run.steps):
            metrics.update(evaluate(trial, step))
        check_finite(metrics, step)
        metrics.update({**once, "time/track_s": track_s})
        once = {}
        start = time.perf_counter()
        ledger.record(step, metrics)
        if due(step, run.samples_every, run.steps):  # artifacts: a retried step rewrites the same file
            tracker.log_table(run_id, sample_rows(trial, step), f"samples/step_{step:05d}.json")
        if step == run.steps:
            tracker.log_text(run_id, json.dumps(metrics, indent=1, sort_keys=True), "final_metrics.json")
        if store is not None and due(step, run.checkpoint_every, run.steps):
            ledger.checkpoint(store, step, trial.learner.save_checkpoint)
        if step == run.steps:
            ledger.flush()  # without checkpoints, the metrics reach MLflow at the end only
        track_s = time.perf_counter() - start  # logged with the next step: tracking + checkpoint time
        report(step, metrics)
