"""`klrl report STUDY`: the seed study's Key Findings as a table computed from an MLflow study.

Reads one experiment (named after the study) through `mlflow.MlflowClient` — sqlite or server — and
writes, into out_dir and as artifacts (folder `report/`) of the study's parent run:
- `report.md`: per task, one row per arm with mean ± 95% t-CI over seeds of each trial's final value,
  a verdict per metric (Welch t between every pair of arms, Holm-adjusted; orchestrator/stats.py), the
  seed study's findings re-tested, and the trials that are missing or unfinished;
- `summary.csv`: one row per trial with its final values;
- `{task}_{accuracy,entropy,kl_exact,kl_estimators,diversity}.png`: curves vs step (orchestrator/plots.py).

"Final" value of a metric in a trial = its mean over the trial's last FINAL_WINDOW steps, which damps
the step-to-step noise of a single batch; metrics logged every few steps (diversity, eval) with no
point in that window use their last logged point. Only complete trials (status FINISHED and at least
`run.steps` logged steps) enter the CIs and tests unless include_unfinished=True, because a trial
stopped early is compared at a different step; unfinished ones are still plotted and listed.

What it reads (written by orchestrator/trial.py and launch.py): the parent run has tag
`klrl.role=study` (newest one wins, preferring run name = study); trials carry `mlflow.parentRunId`,
tags `task`, `seed`, `kl_mode`, `kl_estimator` (fallback: params `task.name`, `run.seed`,
`algorithm.*`), `axis.<dotted field>` tags (other varying settings split an arm, see _suffix_axes),
an optional `arm` tag that overrides the derived arm, and param `run.steps`.
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import plots
from orchestrator.stats import compare_arms, mean_ci

FINAL_WINDOW = 5
PROGRESS_KEY = "reward/mean"  # every step logs it, so its history counts the steps a trial reached
# (column title, metric keys in order of preference: the first one the task logged is used)
TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("final accuracy", ("reward/accuracy", "reward/mean")),
    ("eval pass@1", ("eval/pass_at_1",)),  # MLflow rejects '@': tracking logs eval/pass@1 as this
    ("entropy (nats/token)", ("entropy/token_mean",)),
    ("cosine similarity", ("diversity/embed_cos",)),
    ("distinct valid answers", ("diversity/distinct_valid",)),
    ("exact KL reverse", ("kl/exact_reverse",)),
    ("exact KL forward", ("kl/exact_forward",)),
)
HISTORY_KEYS = sorted({k for _, keys in TABLE for k in keys}
                      | {k for _, panels in plots.FIGURES for k, _ in panels}
                      | {"diversity/distinct_answers", "response/length_mean"})


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


def _seed_order(seed: str) -> tuple[int, int | str]:
    return (0, int(seed)) if seed.isdigit() else (1, seed)  # "10" after "2"


def _arm_order(arm: str) -> tuple[int, str]:
    rank = 0 if arm == "none" else 1 if arm.startswith("in_reward") else 2 if arm.startswith("in_loss") else 3
    return rank, arm


def _in_order(trials) -> list["Trial"]:
    """Trials by task, then arm (none, in_reward, in_loss, others), then seed."""
    return sorted(trials, key=lambda t: (t.task, _arm_order(t.arm), _seed_order(t.seed)))


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

    @property
    def steps_logged(self) -> int:
        return len(set(self.history.get(PROGRESS_KEY, ([], []))[0]))

    @property
    def complete(self) -> bool:
        enough = self.steps_expected is None or self.steps_logged >= self.steps_expected
        return self.status == "FINISHED" and enough

    def final(self, key: str) -> float:
        """Mean of `key` over the trial's last FINAL_WINDOW steps; a metric logged more sparsely
        (diversity, eval) with no point in that window gives its last logged point."""
        steps, values = self.history.get(key, ([], []))
        if not steps:
            return float("nan")
        last = max(self.history.get(PROGRESS_KEY, (steps, []))[0] or steps)
        points = sorted(zip(steps, values))
        tail = [v for s, v in points if s > last - FINAL_WINDOW and not math.isnan(v)]
        if not tail:
            tail = [v for _, v in points if not math.isnan(v)][-1:]
        return sum(tail) / len(tail) if tail else float("nan")


# --- reading MLflow --------------------------------------------------------------------------------

def load_study(study: str, tracking_uri: str):
    """(client, parent run or None, [Trial]) for the experiment named `study`."""
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
    trials = [_trial(client, r) for r in children]
    _suffix_axes(trials, {t.run_id: r for t, r in zip(trials, children)})
    return client, parent, trials


def _trial(client, run) -> Trial:
    tags, params = run.data.tags, run.data.params
    kl_mode = tags.get("kl_mode") or params.get("algorithm.kl_mode", "none")
    kl_est = tags.get("kl_estimator") or params.get("algorithm.kl_estimator", "k1")
    steps = params.get("run.steps")
    history = {}
    for key in HISTORY_KEYS:
        if key in run.data.metrics:
            points = client.get_metric_history(run.info.run_id, key)
            history[key] = ([p.step for p in points], [p.value for p in points])
    return Trial(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                 task=tags.get("task") or params.get("task.name", "task"),
                 arm=tags.get("arm") or arm_name(kl_mode, kl_est),
                 seed=str(tags.get("seed") or params.get("run.seed", "?")), status=run.info.status,
                 steps_expected=int(steps) if steps not in (None, "") else None, history=history)


NOT_ARM_FIELDS = {"algorithm.kl_mode", "algorithm.kl_estimator", "run.seed", "task.name", "run.run_dir"}


def _suffix_axes(trials: list[Trial], runs: dict) -> None:
    """Split derived arms (no `arm` tag) by the other settings that vary within a task.

    Those settings are the trials' `axis.<dotted field>` tags (the study's grid and sampled values)
    or, for runs without axis tags, `algorithm.kl_coef`. The none arm ignores `algorithm.kl_*`
    fields, which it does not use. Optuna studies sample a fresh value per trial, so there every
    trial is its own arm unless the orchestrator sets an `arm` tag.
    """
    for task in {t.task for t in trials}:
        derived = [t for t in trials if t.task == task and "arm" not in runs[t.run_id].data.tags]
        settings = {t.run_id: _settings(runs[t.run_id]) for t in derived}
        fields = {f for s in settings.values() for f in s}
        varying = sorted(f for f in fields if len({settings[t.run_id].get(f) for t in derived}) > 1)
        for t in derived:
            extra = {f: settings[t.run_id].get(f, "?") for f in varying
                     if not (t.arm == "none" and f.startswith("algorithm.kl_"))}
            t.arm = arm_name(*t.arm.split("/", 1), extra) if t.arm != "none" else arm_name("none", "", extra)


def _settings(run) -> dict[str, str]:
    axes = {k[len("axis."):]: v for k, v in run.data.tags.items() if k.startswith("axis.")}
    if not axes and "algorithm.kl_coef" in run.data.params:
        axes = {"algorithm.kl_coef": run.data.params["algorithm.kl_coef"]}
    return {k: v for k, v in axes.items() if k not in NOT_ARM_FIELDS}


# --- building the report ---------------------------------------------------------------------------

def _column_key(trials: list[Trial], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if any(k in t.history for t in trials)), None)


def _missing(trials: list[Trial]) -> list[str]:
    """Trials a full arms x seeds grid would have but MLflow has no run for (per task)."""
    out = []
    for task in sorted({t.task for t in trials}):
        ts = [t for t in trials if t.task == task]
        have = {(t.arm, t.seed) for t in ts}
        for arm in sorted({t.arm for t in ts}, key=_arm_order):
            for seed in sorted({t.seed for t in ts}, key=_seed_order):
                if (arm, seed) not in have:
                    out.append(f"{task} / {arm} / seed {seed}: no run (inferred from the arms x seeds grid)")
    return out


def _unfinished(trials: list[Trial]) -> list[str]:
    return [f"{t.task} / {t.arm} / seed {t.seed} (run {t.name}, {t.run_id[:8]}): status {t.status}, "
            f"{t.steps_logged}/{t.steps_expected if t.steps_expected is not None else '?'} steps"
            for t in _in_order(trials) if not t.complete]


def _no_difference(verdicts) -> str:
    """Does a 'no difference between arms' finding hold? (untestable without 2+ seeds per arm)"""
    tested = [v for v in verdicts if v.testable]
    return "untestable" if not tested else "disagrees" if any(v.any_significant for v in tested) else "agrees"


def _findings(verdicts: dict, finals: dict[str, dict]) -> list[str]:
    """Rows re-testing the seed study's Key Findings (/work/shared/seed.md) on one task."""
    rows = []
    div = [(c, verdicts[c]) for c in ("cosine similarity", "distinct valid answers") if c in verdicts]
    if div:
        rows.append(("No consistent diversity differences between arms", ", ".join(c for c, _ in div),
                     "; ".join(f"{c}: {v.text}" for c, v in div), _no_difference([v for _, v in div])))
    if "entropy (nats/token)" in finals:  # "KL directions": compare the KL arms with each other
        kl_arms = {a: v for a, v in finals["entropy (nats/token)"].items() if a != "none"}
        use = kl_arms if len(kl_arms) >= 2 else finals["entropy (nats/token)"]
        v = compare_arms(use)
        rows.append(("Entropy does not separate KL directions", f"entropy between {', '.join(use)}", v.text,
                     _no_difference([v])))
    if "final accuracy" in verdicts and "none" in finals["final accuracy"]:
        v = verdicts["final accuracy"]
        means = {a: mean_ci(x).mean for a, x in finals["final accuracy"].items() if mean_ci(x).n}
        top = [a for a in means if means[a] == max(means.values())]
        if not top:
            agree = "untestable"
        elif v.best() == "none":
            agree = "agrees"
        elif len(top) > 1:
            agree = f"tie: highest mean shared by {', '.join(top)}"
        elif top == ["none"]:
            agree = "same direction, not significant" if v.testable else "same direction, untestable"
        else:
            agree = f"disagrees (highest mean: {top[0]})"
        rows.append(("No-KL training reaches the highest training accuracy", "final accuracy", v.text, agree))
    return [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]


def task_section(task: str, trials: list[Trial], include_unfinished: bool) -> list[str]:
    used = [t for t in trials if t.complete or include_unfinished]
    arms = sorted({t.arm for t in trials}, key=_arm_order)
    lines = [f"## Task: {task}", ""]
    if not used:
        return lines + ["No complete trial yet (see *Missing or unfinished trials*); "
                        "pass include_unfinished=True to tabulate partial trials.", ""]
    columns = [(title, k) for title, keys in TABLE if (k := _column_key(used, keys))]
    finals = {title: {a: [t.final(k) for t in used if t.arm == a] for a in arms} for title, k in columns}
    header = "| arm | seeds | " + " | ".join(f"{title} (`{k}`)" for title, k in columns) + " |"
    lines += [header, "|" + "---|" * (len(columns) + 2)]
    for a in arms:
        seeds = sorted((t.seed for t in used if t.arm == a), key=_seed_order)
        cells = [mean_ci(finals[title][a]).format() for title, _ in columns]
        lines.append(f"| {a} | {', '.join(seeds) or '—'} | " + " | ".join(cells) + " |")
    verdicts = {title: compare_arms(finals[title]) for title, _ in columns}
    lines += ["", "| metric | verdict |", "|---|---|"]
    lines += [f"| {title} | {verdicts[title].text} |" for title, _ in columns]
    rows = _findings(verdicts, finals)
    if rows:
        lines += ["", "Seed-study Key Findings, re-tested on this task:", "",
                  "| seed-study finding | tested on | result | verdict |", "|---|---|---|---|", *rows]
    return lines + [""]


def render(study: str, trials: list[Trial], include_unfinished: bool, pngs: list[Path]) -> str:
    n_done = sum(t.complete for t in trials)
    lines = [f"# klrl study report: {study}", "",
             f"{len(trials)} trial runs, {n_done} complete. Each cell: mean ± half-width of the 95% "
             f"Student-t CI over seeds of each trial's final value (its mean over the last {FINAL_WINDOW} "
             f"steps, or its last point if logged more sparsely); 'n=1, no CI' with a single seed. "
             f"Verdicts: two-sided Welch t-test between every pair of arms, Holm-adjusted per metric, "
             f"significant at p < 0.05. "
             + ("Unfinished trials are included." if include_unfinished else
                "Only complete trials (FINISHED, all run.steps logged) enter the table and tests."), ""]
    for task in sorted({t.task for t in trials}):
        lines += task_section(task, [t for t in trials if t.task == task], include_unfinished)
    problems = _unfinished(trials) + _missing(trials)
    lines += ["## Missing or unfinished trials", ""] + ([f"- {p}" for p in problems] or ["None."]) + [""]
    if pngs:
        lines += ["## Plots", "", "Curves include unfinished trials (line: mean over seeds, band: min–max).", ""]
        lines += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    return "\n".join(lines)


def write_summary_csv(trials: list[Trial], path: Path) -> Path:
    keys = sorted({k for t in trials for k in t.history})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "arm", "seed", "run_id", "run_name", "status", "steps_logged",
                    "steps_expected", "complete", *[f"final:{k}" for k in keys]])
        for t in _in_order(trials):
            w.writerow([t.task, t.arm, t.seed, t.run_id, t.name, t.status, t.steps_logged,
                        "" if t.steps_expected is None else t.steps_expected, t.complete,
                        *[repr(t.final(k)) if k in t.history else "" for k in keys]])
    return path


def write_report(study: str, tracking_uri: str, out_dir: Path, include_unfinished: bool = False,
                 log_artifacts: bool = True) -> Path:
    """Write report.md, summary.csv and PNGs for `study` into out_dir (and log them to the study's
    parent run under `report/`); returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client, parent, trials = load_study(study, tracking_uri)
    pngs = []
    for task in sorted({t.task for t in trials}):
        series: dict = {}
        for t in _in_order(t for t in trials if t.task == task):
            series.setdefault(t.arm, {})[f"{t.seed}:{t.run_id}"] = t.history
        pngs += plots.plot_study(task, series, out_dir)
    csv_path = write_summary_csv(trials, out_dir / "summary.csv")
    report = out_dir / "report.md"
    report.write_text(render(study, trials, include_unfinished, pngs))
    if log_artifacts and parent is not None:
        try:
            for path in (report, csv_path, *pngs):
                client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
        except Exception as err:  # the files on disk are the report; the artifact copy is a convenience
            warnings.warn(f"report written to {out_dir} but not logged to MLflow run "
                          f"{parent.info.run_id}: {err}", stacklevel=2)
    return report
