"""Figures of a study: per-step curves (one line per arm: mean over seeds, band: min–max over seeds) and
the pass@k curve of each arm against π_ref.

Steps are MLflow steps: step s = after s updates, step 0 = π_ref (the evaluation before any update).
Figures are built with `matplotlib.figure.Figure` (Agg, no pyplot global state), at a fixed size
(PANEL_PX per panel, no tight bbox) so a test can check the PNG's pixel size. MPLCONFIGDIR defaults to
the run directory's cache (workers/environment.py) so matplotlib never writes under $HOME.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

PANEL_PX = (480, 360)  # width, height in pixels of one panel
DPI = 100
STEP_LABEL = "RL step (after s updates; 0 = π_ref)"

# (file stem, [(metric key, panel title, y-axis label with unit), ...]); keys absent from a study are
# left out, and a figure with no key present is not written. Accuracy falls back to reward/mean.
FIGURES: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("accuracy", (("reward/accuracy", "training accuracy", "accuracy (fraction of samples)"),
                  ("reward/mean", "training reward (mean)", "reward (task units)"),
                  ("eval/pass_at_1", "eval pass@1", "pass@1 (fraction of prompts)"))),
    ("entropy", (("entropy/token_mean", "token entropy", "entropy (nats/token)"),)),
    ("kl_exact", (("kl/exact_reverse", "exact KL(π‖π_ref)", "KL (nats/token)"),
                  ("kl/exact_forward", "exact KL(π_ref‖π)", "KL (nats/token)"))),
    ("kl_estimators", (("kl/k1_mean", "k1 estimator", "KL estimate (nats/token)"),
                       ("kl/k2_mean", "k2 estimator", "KL estimate (nats/token)"),
                       ("kl/k3_mean", "k3 estimator", "KL estimate (nats/token)"))),
    ("diversity", (("diversity/embed_cos", "embedding cosine similarity", "cosine similarity (-1 to 1)"),
                   ("diversity/distinct_valid", "distinct valid answers / prompt", "answers per prompt (count)"),
                   ("diversity/distinct_answers", "distinct answers / prompt", "answers per prompt (count)"))),
    ("coverage", (("eval/answer_coverage", "answer coverage |S_π ∩ S_ref| / |S_ref|", "coverage (fraction)"),
                  ("eval/answer_novelty", "answer novelty |S_π \\ S_ref| / |S_π|", "novelty (fraction)"),
                  ("eval/answer_entropy", "valid-answer entropy", "entropy (nats)"))),
)
PASS_AT_K_PREFIX = "eval/pass_at_"

# arm -> seed -> key -> (steps, values)
Series = Mapping[str, Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]]]


def _mplconfig() -> None:
    if "MPLCONFIGDIR" not in os.environ:
        from workers import environment

        os.environ["MPLCONFIGDIR"] = str(environment.run_dir() / "cache" / "matplotlib")
    Path(os.environ["MPLCONFIGDIR"]).mkdir(parents=True, exist_ok=True)


def _figure(panels: int):
    _mplconfig()
    from matplotlib.figure import Figure

    w, h = PANEL_PX
    fig = Figure(figsize=(w * panels / DPI, h / DPI), dpi=DPI)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig, path: Path, title: str, panels: int) -> Path:
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.1 / panels + 0.06, right=0.98, bottom=0.14, top=0.84, wspace=0.35)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def seed_band(per_seed: Sequence[tuple[Sequence[int], Sequence[float]]]):
    """Align seeds on the union of their steps -> (steps, mean, min, max), NaN-aware per step."""
    steps = np.array(sorted({int(s) for st, _ in per_seed for s in st}))
    grid = np.full((len(per_seed), len(steps)), np.nan)
    col = {s: j for j, s in enumerate(steps)}
    for i, (st, vals) in enumerate(per_seed):
        for s, v in zip(st, vals):
            grid[i, col[int(s)]] = v
    with warnings.catch_warnings():  # a step no seed logged is an all-NaN column: NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(grid, 0), np.nanmin(grid, 0), np.nanmax(grid, 0)


def _band(ax, x, mean, lo, hi, n: int, color: str, label: str) -> None:
    # markers keep a metric logged once (eval on a short run) visible
    ax.plot(x, mean, color=color, marker="o", markersize=2.5, label=f"{label} ({n} seed{'s' * (n > 1)})")
    if n > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


def plot_figure(series: Series, panels: Sequence[tuple[str, str, str]], title: str, path: Path) -> Path:
    """One PNG of len(panels) side-by-side panels; each arm is a mean line and a min–max seed band."""
    fig, axes = _figure(len(panels))
    for ax, (key, label, ylabel) in zip(axes, panels):
        for k, (arm, seeds) in enumerate(series.items()):
            per_seed = [seeds[s][key] for s in seeds if key in seeds[s]]
            if per_seed:
                _band(ax, *seed_band(per_seed), len(per_seed), f"C{k}", arm)
        _style(ax, label, STEP_LABEL, ylabel)
    axes[0].legend(fontsize=7)
    return _save(fig, path, f"{title} — mean over seeds, band = min–max", len(panels))


def plot_pass_at_k(task: str, ref: Mapping[int, float], finals: Mapping[str, Mapping[int, Sequence[float]]],
                   path: Path) -> Path:
    """pass@k against k (log2 axis): π_ref (step 0) dashed, each arm's final eval as mean over seeds with
    a min–max band. ref: k -> pass@k of π_ref; finals: arm -> k -> per-seed final pass@k."""
    fig, (ax,) = _figure(1)
    ks = sorted(ref)
    if ks:
        ax.plot(ks, [ref[k] for k in ks], color="black", linestyle="--", marker="s", markersize=3,
                label="π_ref (step 0)")
    for i, (arm, by_k) in enumerate(finals.items()):
        arm_ks = sorted(k for k in by_k if len(by_k[k]))
        if arm_ks:
            vals = [np.asarray(by_k[k], dtype=float) for k in arm_ks]
            _band(ax, arm_ks, [v.mean() for v in vals], [v.min() for v in vals], [v.max() for v in vals],
                  min(len(v) for v in vals), f"C{i}", arm)
    ax.set_xscale("log", base=2)
    all_ks = sorted(set(ks) | {k for by_k in finals.values() for k in by_k})
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.set_ylim(-0.02, 1.02)
    _style(ax, "last eval step; band = min–max over seeds", "k (samples per prompt, log2 scale)",
           "pass@k (fraction of prompts)")
    ax.legend(fontsize=7)
    return _save(fig, path, f"{task}: pass@k per arm against π_ref", 1)


def plot_study(task: str, series: Series, out_dir: Path) -> list[Path]:
    """Every figure of FIGURES whose metrics this task logged -> out_dir/{task}_{stem}.png."""
    present = {key for seeds in series.values() for m in seeds.values() for key in m}
    written = []
    for stem, panels in FIGURES:
        keep = [p for p in panels if p[0] in present]
        if stem == "accuracy" and any(p[0] == "reward/accuracy" for p in keep):
            keep = [p for p in keep if p[0] != "reward/mean"]  # accuracy already shown
        if keep:
            written.append(plot_figure(series, keep, f"{task}: {stem}", out_dir / f"{task}_{stem}.png"))
    return written
