"""The Ray Tune side of a trial: the function trainable and the callback that keeps failed trials failed.

`train` opens (or reopens) the trial's MLflow run, borrows engines from this process's pool (reset for
this trial when Tune reuses the process, see workers/engines.py), samples or reads pi_ref's evaluation,
restores the newest complete checkpoint, then runs `orchestrator.trial.run_steps`, reporting every step
to Tune. Where the checkpoints live: `<Tune storage>/<study>/trial_<id>/checkpoints` (the same trial
folder as Tune's own files; klrl keeps its checkpoints itself, orchestrator/checkpoint.py).

Failures: an error in a step fails the trial and Tune retries it (`tune.max_failures`) from the newest
checkpoint. A non-finite loss, gradient norm, KL or reward is deterministic, so retrying only repeats it:
the trial tags its MLflow run (`klrl.failure`), reports `klrl/failure` to Tune, whose callback
`NoRetryAfterNonFinite` then lets the error end the trial (ERROR), and a later `--resume` finds the tag
and fails the trial again at once.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from core.config import Config, flatten
from orchestrator import evaluation
from orchestrator.checkpoint import CheckpointStore, Ledger
from orchestrator.naming import long_trial_name, short_trial_name
from orchestrator.tracking import PARENT_TAG, ROLE_TAG, STUDY_TAG, TRIAL_TAG, make_tracker
from orchestrator.trial import NonFiniteMetric, Trial, run_steps
from workers import environment
from workers.engines import POOL, create_placement_group, model_folder

FAILURE_TAG = "klrl.failure"  # on a trial's MLflow run: why it failed for good
FAILURE_KEY = "klrl/failure"  # in a Tune result: the trial failed deterministically, do not retry it


@dataclass(frozen=True)
class TrialSetup:
    """What the driver hands every trial (through tune.with_parameters): where to track, and the study."""

    study: Any  # orchestrator.search_space.Study
    run_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str  # Tune's storage (a path or URI); trial checkpoints go under <storage>/<study>/
    git_commit: str = "unknown"


class NoRetryAfterNonFinite(tune.Callback):
    """A trial that reported `klrl/failure` is not retried: the error that follows ends it (ERROR)."""

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get(FAILURE_KEY):
            trial.max_failures = 0


def train(tune_config: dict, setup: TrialSetup) -> None:
    """Tune function trainable: engines, (restore,) steps, report, checkpoint, track."""
    started = time.perf_counter()
    study, context = setup.study, tune.get_context()
    labels, sampled = tune_config.get("grid", {}), tune_config.get("search", {})
    config = study.trial_config(labels, sampled).replace(**{"run.run_dir": setup.run_dir})
    label, trial_id = short_trial_name(study, labels, sampled), context.get_trial_id() or "local"
    tracker = make_tracker(setup.tracking_uri)
    names = {"run": label, "long": long_trial_name(study, labels, sampled), "tune": context.get_trial_name() or label}
    run_id = open_trial_run(tracker, setup, config, trial_id, names, study.trial_overrides(labels, sampled))

    def report(step: int, metrics: dict) -> None:
        tune.report({**metrics, "step": step, "steps_total": config.run.steps, "trial_label": label})

    status, ledger = "FAILED", Ledger(tracker, run_id)
    try:
        if failure := tracker.run_tags(run_id).get(FAILURE_TAG):  # a --resume restarted a failed trial
            tune.report({FAILURE_KEY: failure, "step": 0, "steps_total": config.run.steps, "trial_label": label})
            raise RuntimeError(f"failed for good in an earlier attempt: {failure}")
        trial, startup = build_trial(config)
        store = CheckpointStore(f"{setup.storage_path.rstrip('/')}/{study.name}/trial_{trial_id}/checkpoints",
                                staging=Path(setup.run_dir) / "tmp")
        eval_s = prepare_evaluation(trial, ledger)
        last = ledger.restore(store, trial.learner.load_checkpoint)  # drops step 0 if a checkpoint holds it
        if last:
            trial.learner.sync_weights_to(trial.rollout)
        startup["time/startup_s"] = time.perf_counter() - started - eval_s
        run_steps(trial, last + 1, ledger, store, report, startup)
        if last >= config.run.steps:  # every step was done before this start: Tune still needs the end
            report(config.run.steps, {})
        status = "FINISHED"
    except NonFiniteMetric as error:
        ledger.flush()  # the steps before it are good data; this trial will not run them again
        tracker.set_tags(run_id, {FAILURE_TAG: str(error)})
        tune.report({FAILURE_KEY: str(error), "step": error.step, "steps_total": config.run.steps,
                     "trial_label": label})
        raise
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    except BaseException:
        POOL.discard()  # an engine may be what failed: the next trial here builds fresh ones
        raise
    finally:
        POOL.release()  # per-trial state of the kept engines (the weight-sync group) ends with the trial
        tracker.end_run(run_id, status)


def build_trial(config: Config) -> tuple[Trial, dict[str, float]]:
    """(the trial: task, prompts and engines, its start-up metrics). The engines are the pool's, reset,
    or freshly built in the trial's placement group (inside Tune the current one: bundles_for's layout)."""
    model_path = model_folder(config, environment.run_dir(config.run.run_dir))
    task, prompts, eval_prompts = prepared_task(model_path, config.task)
    start = time.perf_counter()
    pg = ray.util.get_current_placement_group() or create_placement_group(config)
    engines, reused = POOL.acquire(model_path, config, pg)
    startup = {"time/engines_s": time.perf_counter() - start, "engines/reused": float(reused)}
    return Trial(config=config, task=task, prompts=prompts, eval_prompts=eval_prompts, rollout=engines.rollout,
                 learner=engines.learner, embed=embedder().encode), startup


@functools.lru_cache(maxsize=2)
def prepared_task(model_path: Path, task_config) -> tuple[Any, list[str], list[str]]:
    """(task, formatted train prompts, formatted eval prompts): a pure function of its arguments, kept for
    the next trial in this process."""
    from transformers import AutoTokenizer

    from tasks import make_task
    from tasks.prompts import format_prompt, resolve_instruction

    task = make_task(task_config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    instruction = resolve_instruction(task_config.instruction, task.default_instruction)
    return (task, [format_prompt(tokenizer, instruction, e.question) for e in task.train],
            [format_prompt(tokenizer, instruction, e.question) for e in task.eval])


@functools.cache
def embedder():
    """The process's sentence embedder (loaded on first use, kept across trials)."""
    from workers.embedder import Embedder

    return Embedder()


def prepare_evaluation(trial: Trial, ledger: Ledger) -> float:
    """pi_ref's eval answers for this trial (cached per study and seed), and step 0's metrics into the
    ledger; returns the seconds it took. The engines must be at pi_ref, as they are before a restore."""
    config = trial.config
    if config.run.eval_every == 0 or not trial.eval_prompts:
        return 0.0
    start = time.perf_counter()
    model_path = model_folder(config, environment.run_dir(config.run.run_dir))
    trial.reference_answers, metrics = evaluation.reference_answers(
        trial.rollout, trial.task, trial.eval_prompts, model_path, config, Path(config.run.run_dir) / "eval_cache")
    seconds = time.perf_counter() - start
    ledger.record(0, {**metrics, "time/eval_s": seconds})
    return seconds


def open_trial_run(tracker, setup: TrialSetup, config: Config, trial_id: str, names: dict[str, str],
                   overrides: dict) -> str:
    """This trial's nested MLflow run, named `names["run"]` (the short name, orchestrator/naming.py) with the
    long and the Tune names as tags; a restarted or resumed trial reopens the run it had."""
    import yaml

    key = {TRIAL_TAG: trial_id, PARENT_TAG: setup.parent_run_id}
    run_id = tracker.find_run(setup.experiment_id, key)
    if run_id is not None:
        tracker.reopen(run_id)
        return run_id
    a = config.algorithm
    tags = {**key, STUDY_TAG: setup.study.name, ROLE_TAG: "trial", "kl_mode": a.kl_mode,
            "kl_estimator": a.kl_estimator if a.kl_mode != "none" else "-", "seed": str(config.run.seed),
            "task": config.task.name, "git_commit": setup.git_commit, "mlflow.source.git.commit": setup.git_commit,
            "klrl.long_name": names["long"], "klrl.trial_name": names["tune"],
            **{f"axis.{k}": str(v) for k, v in overrides.items()}}
    run_id = tracker.start_run(setup.experiment_id, names["run"], tags, parent_id=setup.parent_run_id)
    tracker.log_params(run_id, flatten(config.to_dict()))
    tracker.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
    return run_id
