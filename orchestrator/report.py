"""`klrl report STUDY`: the study's arms, their paired comparisons and the seed study's findings, from MLflow.

Reads one experiment (named after the study) through `mlflow.MlflowClient` — sqlite or server, nothing
else — and writes, into out_dir and as artifacts (folder `report/`) of the study's parent run:
- `report.md`: per task, one row per arm (mean and 95% CI over seeds of each trial's final value), the
  paired comparisons of every metric (orchestrator/stats.py), the pass@k table against π_ref, the seed
  study's Key Findings re-tested with the paired verdicts, and the failed, unfinished and missing trials;
- `summary.csv` (one row per trial with its final values) and `comparisons.csv` (one row per comparison);
- `{task}_{accuracy,entropy,kl_exact,kl_estimators,diversity,coverage,pass_at_k}.png` (orchestrator/plots.py).

Each trial's final value of a metric is defined in orchestrator/study_runs.py (the last eval step for
`eval/*`, never π_ref's step 0; else the mean of the last FINAL_WINDOW steps). Only complete trials (status
FINISHED, at least `run.steps` steps logged, no `klrl.failure` tag) give final values, unless
include_unfinished; failed trials (status FAILED or a `klrl.failure` tag, e.g. non-finite numbers) never
do, and are listed.
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from orchestrator import plots, stale
from orchestrator.findings import comparison_rows, findings_rows, pass_at_k_section
from orchestrator.stats import MIN_SEEDS_FOR_VERDICT, Bounds, Comparison, compare, mean_ci
from orchestrator.study_runs import FAILURE_TAG, FINAL_WINDOW, Trial, arm_order, in_order, load_study, seed_order

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


def wanted(key: str) -> bool:
    """The metric histories the report reads: its table's, its figures' and every pass@k."""
    return key in HISTORY_KEYS or key.startswith(plots.PASS_AT_K_PREFIX)


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
              + (f", {FAILURE_TAG}: {t.failure}" if t.failure else "") for t in in_order(trials) if t.failed]
    unfinished = [f"{t.task} / {t.arm} / seed {t.seed} (run {t.name}, {t.run_id[:8]}): status {t.status}, "
                  f"{t.steps_logged}/{t.steps_expected if t.steps_expected is not None else '?'} steps"
                  for t in in_order(trials) if not t.complete and not t.failed]
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
        for t in in_order(trials):
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
        for t in in_order(t for t in r.trials if not t.failed):
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
    client, parent, trials = load_study(study, tracking_uri, wanted)
    results = [analyse(task, [t for t in trials if t.task == task], include_unfinished)
               for task in sorted({t.task for t in trials})]
    pngs = _plots(results, out_dir)
    files = [write_summary_csv(trials, out_dir / "summary.csv"),
             write_comparisons_csv(results, out_dir / "comparisons.csv")]
    report = out_dir / "report.md"
    stale_runs = stale.report_section(client, [parent.info.experiment_id]) if parent is not None else ""
    report.write_text(render(study, results, include_unfinished, pngs) + stale_runs)
    if log_artifacts and parent is not None:
        try:
            for path in (report, *files, *pngs):
                client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
        except Exception as err:  # the files on disk are the report; the artifact copy is a convenience
            warnings.warn(f"report written to {out_dir} but not logged to MLflow run "
                          f"{parent.info.run_id}: {err}", stacklevel=2)
    return report
