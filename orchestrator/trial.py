"""One klrl trial: a Tune function trainable that runs `run.steps` RL steps of named, timed stages.

`rl_step` is the whole RL step on one screen (docs/DESIGN.md, "One RL step"). Everything around it is
bookkeeping: building the actors inside the trial's placement group, the MLflow child run, periodic
eval / diversity / sample tables, and Tune checkpoints (learner state + step) so a restarted trial
resumes where it stopped. The loop never branches on estimator or advantage names: `core.kl` and
`core.advantages` look them up in their registries. The one branch is `kl_mode`, the study's
independent variable: it decides whether the KL goes into the reward (here) or the loss (the learner).

Prompt order and sampling seeds are pure functions of (run.seed, step), so the step number is the
whole "RNG / prompt cursor" a checkpoint needs.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.advantages import compute_advantages
from core.config import AlgorithmConfig, Config, flatten
from core.kl import token_kl_penalty
from core.metrics import kl_metrics, offpolicy_metrics, rollout_metrics
from core.types import RolloutBatch, TokenScores, TrainBatch

SAMPLE_ROWS = 16  # rows in each logged sample-completions table


@dataclass(frozen=True)
class TrialSetup:
    """What the driver hands every trial (through tune.with_parameters): where to track, and the study."""

    study: Any  # orchestrator.search_space.Study
    run_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str = "unknown"


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
    eval_prompts: list[str]
    rollout: Any  # workers.actors.RolloutGroup
    learner: Any  # workers.actors.LearnerGroup
    embedder: Any = None  # workers.embedder.Embedder, loaded lazily when diversity is due
    last: dict = field(default_factory=dict)  # the latest step's batch and rewards (for sample tables)

    def shutdown(self) -> None:
        self.rollout.shutdown()
        self.learner.shutdown()

    def step_examples(self, step: int) -> tuple[list[str], list]:
        """This step's prompts: a fresh seeded permutation of the train split per epoch."""
        n, per = len(self.task.train), self.config.task.prompts_per_step
        picked = []
        for i in range(step * per, (step + 1) * per):
            epoch, pos = divmod(i, n)
            order = np.random.default_rng([self.config.run.seed, epoch]).permutation(n)
            picked.append(int(order[pos]))
        return [self.prompts[i] for i in picked], [self.task.train[i] for i in picked]


def rl_step(trial: Trial, step: int) -> dict[str, float]:
    """One RL step: rollout -> reward -> reference -> advantage -> update -> sync -> metrics."""
    cfg, timer = trial.config, StageTimer()
    prompts, examples = trial.step_examples(step)
    with timer("rollout"):
        batch = trial.rollout.generate(prompts, cfg.rollout.n_samples, seed=_seed(cfg, step))
    with timer("reward"):
        rewards = score_rewards(trial.task, batch, examples)
    with timer("reference"):
        scores = trial.learner.score(batch)
    with timer("advantage"):
        advantages = kl_shaped_advantages(cfg.algorithm, batch, scores, rewards)
    with timer("update"):
        update = trial.learner.update(TrainBatch(batch, scores.logprobs, scores.ref_logprobs, advantages))
    with timer("sync"):
        trial.rollout.update_weights(trial.learner.export_weights_ref())
    with timer("metrics"):
        metrics = step_metrics(trial, step, batch, scores, rewards, update)
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


def step_metrics(trial: Trial, step: int, batch: RolloutBatch, scores: TokenScores, rewards: torch.Tensor,
                 update: dict[str, float]) -> dict[str, float]:
    """Every per-step metric (section/name keys); diversity only every run.diversity_every steps."""
    out = {**rollout_metrics(batch, rewards), **kl_metrics(scores, batch.response_mask),
           **offpolicy_metrics(batch, scores), **update}
    if _due(step, trial.config.run.diversity_every, trial.config.run.steps):
        out.update(diversity(trial, batch, rewards))
    return out


def diversity(trial: Trial, batch: RolloutBatch, rewards: torch.Tensor) -> dict[str, float]:
    from core.diversity import diversity_metrics

    if trial.embedder is None:
        from workers.embedder import Embedder

        trial.embedder = Embedder()
    answers = [trial.task.extract_answer(text) for text in batch.response_texts]
    valid = (rewards >= 1.0).tolist()  # full reward = a correct answer (format reward is < 1)
    return diversity_metrics(batch.response_texts, answers, valid, batch.group_index,
                             embeddings=trial.embedder.encode(batch.response_texts))


def evaluate(trial: Trial, step: int) -> dict[str, float]:
    """pass@k on the eval split: run.eval_n_samples samples per eval prompt, correct = full reward."""
    from core.diversity import pass_at_k_metrics

    n = trial.config.run.eval_n_samples
    if not trial.eval_prompts:
        return {}
    start = time.perf_counter()
    batch = trial.rollout.generate(trial.eval_prompts, n, seed=_seed(trial.config, step) + 7919)
    rewards = score_rewards(trial.task, batch, trial.task.eval).reshape(len(trial.eval_prompts), n)
    out = pass_at_k_metrics((rewards >= 1.0).numpy())
    out.update({"eval/reward_mean": float(rewards.mean()), "time/eval_s": time.perf_counter() - start})
    return out


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


def _seed(cfg: Config, step: int) -> int:
    return (cfg.run.seed * 1_000_003 + step) % (2**31 - 1)


def _due(step: int, every: int, steps: int) -> bool:
    """True on every `every`-th step (1-based) and on the last step; never when every == 0."""
    return every > 0 and ((step + 1) % every == 0 or step + 1 == steps)


# ---- the Tune trainable ---------------------------------------------------------------------------

def train(tune_config: dict, setup: TrialSetup) -> None:
    """Tune function trainable: build, (restore,) loop over steps, report, checkpoint, track."""
    from ray import tune

    from orchestrator.naming import long_trial_name, short_trial_name
    from orchestrator.tracking import make_tracker

    study = setup.study
    labels, sampled = tune_config.get("grid", {}), tune_config.get("search", {})
    config = study.trial_config(labels, sampled).replace(**{"run.run_dir": setup.run_dir})
    context = tune.get_context()
    tracker = make_tracker(setup.tracking_uri)
    run_id = _open_child_run(tracker, setup, config, context, short_trial_name(study, labels, sampled),
                             study.trial_overrides(labels, sampled), long_trial_name(study, labels, sampled))
    status, trial = "FAILED", None
    try:
        t0 = time.perf_counter()
        trial = build_trial(config)
        start = restore(trial, tune.get_checkpoint())
        # Actor start-up (vLLM engine, DeepSpeed init) is per trial, not per step: logged once.
        tracker.log_metrics(run_id, {"time/startup_s": time.perf_counter() - t0}, step=start)
        loop(trial, start, tracker, run_id)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        tracker.end_run(run_id, status)
        if trial is not None:  # actors die with the trial process anyway; this frees them promptly
            trial.shutdown()


def loop(trial: Trial, start: int, tracker, run_id: str) -> None:
    from ray import tune

    run, track_s, metrics = trial.config.run, 0.0, {}
    for step in range(start, run.steps):
        metrics = rl_step(trial, step)
        if _due(step, run.eval_every, run.steps):
            metrics.update(evaluate(trial, step))
        metrics.update({"step": step + 1, "time/track_s": track_s})
        t0 = time.perf_counter()
        tracker.log_metrics(run_id, metrics, step=step)
        if _due(step, run.samples_every, run.steps):
            tracker.log_table(run_id, sample_rows(trial, step), f"samples/step_{step + 1:05d}.json")
        if step + 1 == run.steps:
            tracker.log_text(run_id, json.dumps(metrics, indent=1, sort_keys=True), "final_metrics.json")
        track_s = time.perf_counter() - t0  # logged with the next step: MLflow overhead per step
        if _due(step, run.checkpoint_every, run.steps):
            # Under the run dir, not /tmp: the learner actor writes it, possibly on another node, so
            # on a multi-node cluster the run dir must be a shared filesystem (e.g. EFS/NFS).
            staging = Path(run.run_dir) / "tmp"
            staging.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="ckpt-", dir=staging) as tmp:
                save(trial, step + 1, Path(tmp))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(metrics)


def build_trial(config: Config) -> Trial:
    """Task, prompts, policy folder and the trial's actors (placed in the trial's placement group)."""
    import ray
    from transformers import AutoTokenizer

    from tasks import make_task
    from tasks.policy import resolve_policy
    from tasks.prompts import format_prompt, resolve_instruction
    from workers import environment
    from workers.actors import create_placement_group

    torch.manual_seed(config.run.seed)
    random.seed(config.run.seed)
    task = make_task(config.task)
    model_path = local_model(resolve_policy(config.model, environment.run_dir(config.run.run_dir), config.task))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    instruction = resolve_instruction(config.task.instruction, task.default_instruction)
    fmt = lambda examples: [format_prompt(tokenizer, instruction, e.question) for e in examples]  # noqa: E731
    # Inside a Tune trial the current placement group is the trial's (bundles_for: learners, rollouts).
    pg = ray.util.get_current_placement_group() or create_placement_group(config)
    learner, rollout = start_actors(model_path, config, pg)
    return Trial(config=config, task=task, prompts=fmt(task.train), eval_prompts=fmt(task.eval),
                 rollout=rollout, learner=learner)


def start_actors(model_path: Path, config: Config, pg) -> tuple[Any, Any]:
    """(LearnerGroup, RolloutGroup), started side by side: engine start-up is mostly single-threaded
    Python (model load, vLLM's profiling run, DeepSpeed init), so overlapping the two cut a miniature
    trial's start-up from 20.8 s to 12.3 s on 2 cores. If either fails, the other is shut down."""
    from concurrent.futures import ThreadPoolExecutor

    from workers.actors import LearnerGroup, RolloutGroup

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-start") as pool:
        rollout_start = pool.submit(RolloutGroup, model_path, config, pg)
        try:
            learner = LearnerGroup(model_path, config, pg)
        except BaseException:
            if rollout_start.exception() is None:  # waits for it: no actor may outlive the failure
                rollout_start.result().shutdown()
            raise
        try:
            rollout = rollout_start.result()
        except BaseException:
            learner.shutdown()
            raise
    return learner, rollout


def local_model(path: Path | str) -> Path:
    """A hub id as its folder in the local HF cache (the engines need a folder; klrl never downloads
    mid-study: cluster.yaml's setup pre-fetches the seed studies' policy on every node)."""
    if isinstance(path, Path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"model.path: {path!r} is not in the local Hugging Face cache "
                                f"($HF_HOME); fetch it first: huggingface-cli download {path}") from None


def save(trial: Trial, next_step: int, folder: Path) -> None:
    trial.learner.save_checkpoint(str(folder / "learner"))
    state = {"next_step": next_step, "prompt_cursor": next_step * trial.config.task.prompts_per_step}
    (folder / "trial_state.json").write_text(json.dumps(state))


def restore(trial: Trial, checkpoint) -> int:
    """The step to start from: 0, or the checkpoint's next step after loading the learner and syncing."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        trial.learner.load_checkpoint(str(Path(folder) / "learner"))
        state = json.loads((Path(folder) / "trial_state.json").read_text())
    trial.rollout.update_weights(trial.learner.export_weights_ref())
    return int(state["next_step"])


def _open_child_run(tracker, setup: TrialSetup, config: Config, context, name: str, overrides: dict,
                    long_name: str = "") -> str:
    """This trial's nested MLflow run; a restarted or resumed trial reopens the run it had."""
    import yaml

    from orchestrator.tracking import PARENT_TAG, ROLE_TAG, STUDY_TAG, TRIAL_TAG

    trial_id = context.get_trial_id() or "local"
    key = {TRIAL_TAG: trial_id, PARENT_TAG: setup.parent_run_id}
    run_id = tracker.find_run(setup.experiment_id, key)
    if run_id is not None:
        tracker.reopen(run_id)
        return run_id
    a = config.algorithm
    tags = {**key, STUDY_TAG: setup.study.name, ROLE_TAG: "trial", "kl_mode": a.kl_mode,
            "kl_estimator": a.kl_estimator if a.kl_mode != "none" else "-", "klrl.long_name": long_name or name,
            "seed": str(config.run.seed), "task": config.task.name, "git_commit": setup.git_commit,
            "mlflow.source.git.commit": setup.git_commit, "klrl.trial_name": context.get_trial_name() or name,
            **{f"axis.{k}": str(v) for k, v in overrides.items()}}
    run_id = tracker.start_run(setup.experiment_id, name, tags, parent_id=setup.parent_run_id)
    tracker.log_params(run_id, flatten(config.to_dict()))
    tracker.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
    return run_id
