"""A study's trial runs as read from MLflow (sqlite or server), with the final value of each metric.

What it reads (written by orchestrator/trial.py and launch.py): the parent run has tag `klrl.role=study`
(newest wins, preferring run name = study); trials carry `mlflow.parentRunId`, tags `task`, `seed`,
`kl_mode`, `kl_estimator` (fallback: params), `axis.<dotted field>` tags (other varying settings split
an arm, see _suffix_axes), an optional `arm` tag that overrides the derived arm, an optional
`klrl.failure` tag (why the trial failed, e.g. a non-finite number) and param `run.steps`.

Steps: MLflow step s = after s updates (1-based); step 0 is the evaluation of π_ref, logged by every
trial before its first update. "Final" value of a trial: for eval metrics (`eval/*`) the last eval step
(never step 0); for the others the mean over the trial's last FINAL_WINDOW steps, which damps the noise
of a single batch (a sparser metric with no point in that window uses its last point).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

FINAL_WINDOW = 5
REF_STEP = 0  # the step of π_ref's evaluation
PROGRESS_KEY = "reward/mean"  # every step logs it, so its history counts the steps a trial reached
FAILURE_TAG = "klrl.failure"


def arm_name(kl_mode: str, kl_estimator: str, extra: dict[str, str] | None = None) -> str:
    """A trial's arm: 'none' or '{kl_mode}/{kl_estimator}' (e.g. 'in_reward/k1'), then ' field=value'
    for each other setting that varies between the study's trials (e.g. 'in_loss/k3 kl_coef=0.1')."""
    base = "none" if kl_mode == "none" else f"{kl_mode}/{kl_estimator}"
    return " ".join([base, *(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in sorted((extra or {}).items()))])


def _short(value: str) -> str:
    """A sampled float as 4 significant digits (Optuna's 0.00703573702872215 -> 0.007036); else as is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() or len(value) <= 6 else f"{number:.4g}"


def seed_order(seed: str) -> tuple[int, int | str]:
    return (0, int(seed)) if seed.isdigit() else (1, seed)  # "10" after "2"


def arm_order(arm: str) -> tuple[int, str]:
    rank = 0 if arm == "none" else 1 if arm.startswith("in_reward") else 2 if arm.startswith("in_loss") else 3
    return rank, arm


def in_order(trials) -> list["Trial"]:
    """Trials by task, then arm (none, in_reward, in_loss, others), then seed."""
    return sorted(trials, key=lambda t: (t.task, arm_order(t.arm), seed_order(t.seed)))


@dataclass
class Trial:
    run_id: str
    name: str
    task: str
    arm: str
    seed: str
    status: str
    steps_expected: int | None
    history: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    failure: str = ""  # the klrl.failure tag: why the trial failed (e.g. a non-finite loss)

    @property
    def steps_logged(self) -> int:
        return len(set(self.history.get(PROGRESS_KEY, ([], []))[0]))

    @property
    def failed(self) -> bool:
        return self.status == "FAILED" or bool(self.failure)

    @property
    def complete(self) -> bool:
        enough = self.steps_expected is None or self.steps_logged >= self.steps_expected
        return self.status == "FINISHED" and not self.failed and enough

    def final(self, key: str) -> float:
        """The trial's final value of `key` (see the module docstring); NaN if it has none."""
        points = sorted((s, v) for s, v in zip(*self.history.get(key, ([], []))) if s != REF_STEP and math.isfinite(v))
        if not points:
            return float("nan")
        if key.startswith("eval/"):
            return points[-1][1]
        last = max(self.history.get(PROGRESS_KEY, ([points[-1][0]], []))[0])
        tail = [v for s, v in points if s > last - FINAL_WINDOW] or [points[-1][1]]
        return sum(tail) / len(tail)

    def ref(self, key: str) -> float:
        """π_ref's value of an eval metric: the trial's step-0 point (NaN if not logged)."""
        steps, values = self.history.get(key, ([], []))
        return next((v for s, v in zip(steps, values) if s == REF_STEP), float("nan"))


# --- reading MLflow --------------------------------------------------------------------------------

def load_study(study: str, tracking_uri: str, wanted: Callable[[str], bool]):
    """(client, parent run or None, [Trial]) for the experiment named `study`; the history of each metric
    key for which wanted(key) is true is loaded (one MLflow call per key and trial)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"study {study!r}: no MLflow experiment of that name at {tracking_uri}; "
                         f"experiments there: {names}")
    runs = client.search_runs([exp.experiment_id], max_results=50000, order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("klrl.role") == "study"]
    named = [r for r in parents if r.info.run_name == study]
    parent = (named or parents or [None])[0]  # newest first: a re-run study reports its latest parent
    if parent is not None:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    else:  # no parent run: every run of the experiment is a trial
        children = [r for r in runs if r.data.tags.get("klrl.role") != "study"]
    trials = [_trial(client, r, wanted) for r in children]
    _suffix_axes(trials, {t.run_id: r for t, r in zip(trials, children)})
    return client, parent, trials


def _trial(client, run, wanted: Callable[[str], bool]) -> Trial:
    tags, params = run.data.tags, run.data.params
    kl_mode = tags.get("kl_mode") or params.get("algorithm.kl_mode", "none")
    kl_est = tags.get("kl_estimator") or params.get("algorithm.kl_estimator", "k1")
    steps = params.get("run.steps")
    history = {}
    for key in run.data.metrics:
        if wanted(key):
            points = client.get_metric_history(run.info.run_id, key)
            history[key] = ([p.step for p in points], [p.value for p in points])
    return Trial(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                 task=tags.get("task") or params.get("task.name", "task"),
                 arm=tags.get("arm") or arm_name(kl_mode, kl_est),
                 seed=str(tags.get("seed") or params.get("run.seed", "?")), status=run.info.status,
                 steps_expected=int(steps) if steps not in (None, "") else None, history=history,
                 failure=tags.get(FAILURE_TAG, ""))


NOT_ARM_FIELDS = {"algorithm.kl_mode", "algorithm.kl_estimator", "run.seed", "task.name", "run.run_dir"}


def _suffix_axes(trials: list[Trial], runs: dict) -> None:
    """Split derived arms (no `arm` tag) by the other settings that vary within an arm of a task.

    Those settings are the trials' `axis.<dotted field>` tags (the study's grid and sampled values)
    or, for runs without axis tags, `algorithm.kl_coef`. The none arm ignores `algorithm.kl_*`
    fields, which it does not use. Optuna studies sample a fresh value per trial, so there every
    trial is its own arm unless the orchestrator sets an `arm` tag.
    """
    for task in {t.task for t in trials}:
        derived = [t for t in trials if t.task == task and "arm" not in runs[t.run_id].data.tags]
        settings = {t.run_id: _settings(runs[t.run_id]) for t in derived}
        by_arm: dict[str, list[Trial]] = {}
        for t in derived:
            by_arm.setdefault(t.arm, []).append(t)
        # A field splits an arm only where it differs between that arm's trials: a setting that comes
        # with its arm (the k3 arm's kl_clamp, absent from the others) is named by the arm already.
        varying = {arm: sorted(f for f in {f for t in group for f in settings[t.run_id]}
                               if len({settings[t.run_id].get(f) for t in group}) > 1)
                   for arm, group in by_arm.items()}
        for t in derived:
            extra = {f: settings[t.run_id].get(f, "?") for f in varying[t.arm]
                     if not (t.arm == "none" and f.startswith("algorithm.kl_"))}
            t.arm = arm_name(*t.arm.split("/", 1), extra) if t.arm != "none" else arm_name("none", "", extra)


def _settings(run) -> dict[str, str]:
    axes = {k[len("axis."):]: v for k, v in run.data.tags.items() if k.startswith("axis.")}
    if not axes and "algorithm.kl_coef" in run.data.params:
        axes = {"algorithm.kl_coef": run.data.params["algorithm.kl_coef"]}
    return {k: v for k, v in axes.items() if k not in NOT_ARM_FIELDS}
