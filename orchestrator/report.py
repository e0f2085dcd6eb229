"""`klrl report STUDY`: the study's arms, their paired comparisons and the seed study's findings, from MLflow.

Reads one experiment (named after the study) through `mlflow.MlflowClient` — sqlite or server, nothing
else — and writes, into out_dir and as artifacts (folder `report/`) of the study's parent run:
- `report.md`: per task, one row per arm (mean and 95% CI over seeds of each trial's final value), the
  paired comparisons of every metric (orchestrator/stats.py), the pass@k table against π_ref, the seed
  study's Key Findings re-tested with the paired verdicts, and the failed, unfinished and missing trials;
- `summary.csv` (one row per trial with its final values) and `comparisons.csv` (one row per comparison);
- `{task}_{accuracy,entropy,kl_exact,kl_estimators,diversity,coverage,pass_at_k}.png` (orchestrator/plots.py).

Steps: MLflow step s = after s updates (1-based); step 0 is the evaluation of π_ref, logged by every
trial before its first update. "Final" value of a trial: for eval metrics (`eval/*`) the last eval step
(never step 0); for the others the mean over the trial's last FINAL_WINDOW steps, which damps the noise
of a single batch (a sparser metric with no point in that window uses its last point). Only complete
trials (status FINISHED, at least `run.steps` steps logged, no `klrl.failure` tag) give final values,
unless include_unfinished; failed trials (status FAILED or a `klrl.failure` tag, e.g. non-finite numbers)
never do, and are listed.

What it reads (written by orchestrator/trial.py and launch.py): the parent run has tag `klrl.role=study`
(newest wins, preferring run name = study); trials carry `mlflow.parentRunId`, tags `task`, `seed`,
`kl_mode`, `kl_estimator` (fallback: params), `axis.<dotted field>` tags (other varying settings split
an arm, see _suffix_axes), an optional `arm` tag that overrides the derived arm, and param `run.steps`.
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import plots
from orchestrator.findings import comparison_rows, findings_rows, pass_at_k_section
from orchestrator.stats import MIN_SEEDS_FOR_VERDICT, Bounds, Comparison, compare, mean_ci

FINAL_WINDOW = 5
REF_STEP = 0  # the step of π_ref's evaluation
PROGRESS_KEY = "reward/mean"  # every step logs it, so its history counts the steps a trial reached
FAILURE_TAG = "klrl.failure"
UNIT: Bounds = (0.0, 1.0)
NONNEG: Bounds = (0.0, None)


@dataclass(frozen=True)
class Column:
    """A metric of the arms table: its title (with unit), keys in order of preference (the first one the
    task logged is used) and the range of its values (the CIs are clipped to it)."""

    title: str
    keys: tuple[str, ...]
    bounds: Bounds


TABLE: tuple[Column, ...] = (
    Column("final accuracy", ("reward/accuracy", "reward/mean"), UNIT),
    Column("eval pass@1", ("eval/pass_at_1",), UNIT),
    # eval pass@n (the largest k logged) is added per task, see columns()
    Column("answer coverage", ("eval/answer_coverage",), UNIT),
    Column("answer novelty", ("eval/answer_novelty",), UNIT),
    Column("answer entropy (nats)", ("eval/answer_entropy",), NONNEG),
    Column("eval distinct valid answers", ("eval/distinct_valid",), NONNEG),
    Column("entropy (nats/token)", ("entropy/token_mean",), NONNEG),
    Column("cosine similarity", ("diversity/embed_cos",), (-1.0, 1.0)),
    Column("distinct valid answers", ("diversity/distinct_valid",), NONNEG),
    Column("exact KL reverse (nats/token)", ("kl/exact_reverse",), NONNEG),
    Column("exact KL forward (nats/token)", ("kl/exact_forward",), NONNEG),
)
HISTORY_KEYS = frozenset({k for c in TABLE for k in c.keys} | {p[0] for _, panels in plots.FIGURES for p in panels})


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


def _in_order(trials) -> list["Trial"]:
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
    for key in run.data.metrics:
        if key in HISTORY_KEYS or key.startswith(plots.PASS_AT_K_PREFIX):
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


# --- the numbers of one task ------------------------------------------------------------------------

def pass_at_k_ks(trials: list[Trial]) -> list[int]:
    """The k of every `eval/pass_at_{k}` key the trials logged, ascending."""
    n = len(plots.PASS_AT_K_PREFIX)
    return sorted({int(k[n:]) for t in trials for k in t.history if k.startswith(plots.PASS_AT_K_PREFIX)
                   and k[n:].isdigit()})


def columns(trials: list[Trial]) -> list[tuple[Column, str]]:
    """(column, the key this task logged for it), in TABLE order, with eval pass@n after pass@1."""
    table = list(TABLE)
    ks = pass_at_k_ks(trials)
    if ks and ks[-1] > 1:
        table.insert(2, Column(f"eval pass@{ks[-1]}", (f"{plots.PASS_AT_K_PREFIX}{ks[-1]}",), UNIT))
    logged = {k for t in trials for k in t.history}
    return [(c, key) for c in table if (key := next((k for k in c.keys if k in logged), None))]


def finals_by_arm(trials: list[Trial], key: str) -> dict[str, dict[str, float]]:
    """arm -> seed -> final value (a seed run twice counts once: the newest run, listed first by MLflow)."""
    out: dict[str, dict[str, float]] = {}
    for t in trials:
        out.setdefault(t.arm, {}).setdefault(t.seed, t.final(key))
    return out


def comparison_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(arm, ref) pairs: every arm against `none` (every pair of arms when there is no none arm), and
    in_reward/k1 against in_loss/k3 where both exist with the same other settings."""
    if "none" in arms:
        pairs = [(a, "none") for a in arms if a != "none"]
    else:
        pairs = [(a, b) for i, b in enumerate(arms) for a in arms[i + 1:]]
    base_rest = {a: (a.split(" ", 1) + [""])[:2] for a in arms}
    for a in arms:
        for b in arms:
            same_rest = base_rest[a][1] == base_rest[b][1]
            if base_rest[a][0] == "in_reward/k1" and base_rest[b][0] == "in_loss/k3" and same_rest \
                    and (a, b) not in pairs and (b, a) not in pairs:
                pairs.append((a, b))
    return pairs


@dataclass
class TaskResult:
    """Everything the report says about one task."""

    task: str
    trials: list[Trial]  # all of the task's trials
    used: list[Trial]  # the ones that give final values
    arms: list[str]
    columns: list[tuple[Column, str]]
    comparisons: dict[str, list[Comparison]]  # column title -> comparisons

    @property
    def underpowered(self) -> bool:
        """Fewer than MIN_SEEDS_FOR_VERDICT seeds in some arm: no significance verdicts at all."""
        return min((len(self.seeds(a)) for a in self.arms), default=0) < MIN_SEEDS_FOR_VERDICT

    def seeds(self, arm: str) -> list[str]:
        return sorted({t.seed for t in self.used if t.arm == arm}, key=seed_order)

    def finals(self, key: str) -> dict[str, dict[str, float]]:
        return finals_by_arm(self.used, key)

    @property
    def ks(self) -> list[int]:
        return pass_at_k_ks(self.used)

    def ref_values(self, key: str) -> list[float]:
        """π_ref's step-0 value of `key` in each trial that logged it (all equal when the trials agree)."""
        return [v for t in self.used if math.isfinite(v := t.ref(key))]


def analyse(task: str, trials: list[Trial], include_unfinished: bool) -> TaskResult:
    used = [t for t in trials if (t.complete or include_unfinished) and not t.failed]
    arms = sorted({t.arm for t in used}, key=arm_order)
    cols = columns(used)
    pairs = comparison_pairs(arms)
    comps = {c.title: compare(finals_by_arm(used, key), pairs, c.bounds) for c, key in cols}
    return TaskResult(task, trials, used, arms, cols, comps)


# --- report.md --------------------------------------------------------------------------------------

INTRO = (
    "Steps are counted from 1 (MLflow step s = after s updates); step 0 is π_ref, evaluated by every trial "
    "before its first update. A trial's final value is its last eval step for `eval/*` metrics and its mean "
    "over the last {window} steps for the others; only complete trials (FINISHED, all run.steps logged, not "
    "failed) give final values{unfinished}. Arms table: mean and 95% Student-t CI over seeds, written "
    "`mean ± half-width`, or `mean [lo, hi]` where the interval reached a bound of the metric's range and was "
    "clipped there (accuracy, pass@k, coverage and novelty lie in [0, 1], cosine in [-1, 1], entropies, KLs "
    "and counts are >= 0). Comparisons are paired by seed (arms that share a seed share prompts and sampling "
    "seeds): each arm minus `none`, and in_reward/k1 minus in_loss/k3; mean difference with its 95% t-CI "
    "(clipped to the range of a difference), Cohen's d_z = mean / SD of the per-seed differences, the paired "
    "t-test (which gives the verdict) and a sign-flip permutation test (exact up to 16 pairs; its smallest "
    "possible p is 2/2^n, so it can only reach 0.05 from 6 pairs), both Holm-adjusted over the comparisons of "
    "a metric, significant at p < 0.05. No verdict is given with fewer than {min_seeds} paired seeds. "
    "'Seeds for 80% power': paired seeds the t-test needs to detect the observed d_z with 80% power at "
    "0.05 / (comparisons of the metric).")


def task_section(r: TaskResult) -> list[str]:
    lines = [f"## Task: {r.task}", ""]
    if not r.used:
        return lines + ["No complete trial yet (see *Failed, unfinished and missing trials*); "
                        "pass include_unfinished=True to tabulate partial trials.", ""]
    if r.underpowered:
        counts = ", ".join(f"{a}: {len(r.seeds(a))}" for a in r.arms)
        lines += [f"**Underpowered: fewer than {MIN_SEEDS_FOR_VERDICT} seeds per arm ({counts}).** The numbers "
                  f"below describe these seeds only; no significance verdict is printed.", ""]
    lines += ["### Arms", "", "| arm | seeds | " + " | ".join(f"{c.title} (`{k}`)" for c, k in r.columns) + " |",
              "|" + "---|" * (len(r.columns) + 2)]
    for a in r.arms:
        cells = [mean_ci(list(r.finals(k).get(a, {}).values()), c.bounds).format() for c, k in r.columns]
        lines.append(f"| {a} | {', '.join(r.seeds(a)) or '—'} | " + " | ".join(cells) + " |")
    lines += ["", "### Paired comparisons", "", *comparison_rows(r)]
    lines += pass_at_k_section(r)
    rows = findings_rows(r)
    if rows:
        lines += ["", "### Seed-study Key Findings, re-tested", "",
                  "| seed-study finding | tested on | result | verdict |", "|---|---|---|---|", *rows]
    return lines + [""]


def _problems(trials: list[Trial]) -> tuple[list[str], list[str]]:
    """(failed, unfinished or missing) trial descriptions."""
    failed = [f"{t.task} / {t.arm} / seed {t.seed} (run {t.name}, {t.run_id[:8]}): status {t.status}"
              + (f", {FAILURE_TAG}: {t.failure}" if t.failure else "") for t in _in_order(trials) if t.failed]
    unfinished = [f"{t.task} / {t.arm} / seed {t.seed} (run {t.name}, {t.run_id[:8]}): status {t.status}, "
                  f"{t.steps_logged}/{t.steps_expected if t.steps_expected is not None else '?'} steps"
                  for t in _in_order(trials) if not t.complete and not t.failed]
    for task in sorted({t.task for t in trials}):  # what a full arms x seeds grid would have
        ts = [t for t in trials if t.task == task]
        have = {(t.arm, t.seed) for t in ts}
        unfinished += [f"{task} / {arm} / seed {seed}: no run (inferred from the arms x seeds grid)"
                       for arm in sorted({t.arm for t in ts}, key=arm_order)
                       for seed in sorted({t.seed for t in ts}, key=seed_order) if (arm, seed) not in have]
    return failed, unfinished


def render(study: str, results: list[TaskResult], include_unfinished: bool, pngs: list[Path]) -> str:
    trials = [t for r in results for t in r.trials]
    failed, unfinished = _problems(trials)
    lines = [f"# klrl study report: {study}", "",
             f"{len(trials)} trial runs: {sum(t.complete for t in trials)} complete, {len(failed)} failed.", "",
             INTRO.format(window=FINAL_WINDOW, min_seeds=MIN_SEEDS_FOR_VERDICT,
                          unfinished="; here unfinished trials are included" if include_unfinished else ""), ""]
    for r in results:
        lines += task_section(r)
    lines += ["## Failed trials", "", "Failed trials never give a final value.", ""]
    lines += [f"- {p}" for p in failed] or ["None."]
    lines += ["", "## Unfinished or missing trials", ""] + ([f"- {p}" for p in unfinished] or ["None."]) + [""]
    if pngs:
        lines += ["## Plots", "", "Curves include unfinished trials (line: mean over seeds, band: min–max).", ""]
        lines += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    return "\n".join(lines)


# --- files --------------------------------------------------------------------------------------------

def write_summary_csv(trials: list[Trial], path: Path) -> Path:
    keys = sorted({k for t in trials for k in t.history})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "arm", "seed", "run_id", "run_name", "status", "failure", "steps_logged",
                    "steps_expected", "complete", *[f"final:{k}" for k in keys]])
        for t in _in_order(trials):
            w.writerow([t.task, t.arm, t.seed, t.run_id, t.name, t.status, t.failure, t.steps_logged,
                        "" if t.steps_expected is None else t.steps_expected, t.complete,
                        *[repr(t.final(k)) if k in t.history and not t.failed else "" for k in keys]])
    return path


def write_comparisons_csv(results: list[TaskResult], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "metric", "key", "arm", "ref", "pairs", "mean_diff", "ci_lo", "ci_hi", "d_z", "t",
                    "p_t", "p_t_holm", "p_signflip", "p_signflip_holm", "significant", "seeds_for_80pct_power"])
        for r in results:
            for c, key in r.columns:
                for x in r.comparisons[c.title]:
                    w.writerow([r.task, c.title, key, x.arm, x.ref, x.n, x.diff.mean, x.diff.lo, x.diff.hi, x.dz,
                                x.t, x.p_t, x.p_t_adj, x.p_perm, x.p_perm_adj, x.significant, x.seeds_needed() or ""])
    return path


def _plots(results: list[TaskResult], out_dir: Path) -> list[Path]:
    pngs = []
    for r in results:
        series: dict = {}
        for t in _in_order(t for t in r.trials if not t.failed):
            series.setdefault(t.arm, {})[f"{t.seed}:{t.run_id}"] = t.history
        pngs += plots.plot_study(r.task, series, out_dir)
        if r.ks:
            keys = {k: f"{plots.PASS_AT_K_PREFIX}{k}" for k in r.ks}
            ref = {k: sum(vs) / len(vs) for k, key in keys.items() if (vs := r.ref_values(key))}
            arm_finals = {a: {k: [v for v in r.finals(key).get(a, {}).values() if math.isfinite(v)]
                              for k, key in keys.items()} for a in r.arms}
            pngs.append(plots.plot_pass_at_k(r.task, ref, arm_finals, out_dir / f"{r.task}_pass_at_k.png"))
    return pngs


def write_report(study: str, tracking_uri: str, out_dir: Path, include_unfinished: bool = False,
                 log_artifacts: bool = True) -> Path:
    """Write report.md, summary.csv, comparisons.csv and PNGs for `study` into out_dir (and log them to the
    study's parent run under `report/`); returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client, parent, trials = load_study(study, tracking_uri)
    results = [analyse(task, [t for t in trials if t.task == task], include_unfinished)
               for task in sorted({t.task for t in trials})]
    pngs = _plots(results, out_dir)
    files = [write_summary_csv(trials, out_dir / "summary.csv"),
             write_comparisons_csv(results, out_dir / "comparisons.csv")]
    report = out_dir / "report.md"
    report.write_text(render(study, results, include_unfinished, pngs))
    if log_artifacts and parent is not None:
        try:
            for path in (report, *files, *pngs):
                client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
        except Exception as err:  # the files on disk are the report; the artifact copy is a convenience
            warnings.warn(f"report written to {out_dir} but not logged to MLflow run "
                          f"{parent.info.run_id}: {err}", stacklevel=2)
    return report
