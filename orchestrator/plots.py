"""Per-step curves of a study: one line per arm (mean over seeds) with a min–max band over seeds.

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

# (file stem, [(metric key, panel title), ...]); keys absent from a study are left out, and a figure
# with no key present is not written. Accuracy falls back to reward/mean when no reward/accuracy.
FIGURES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("accuracy", (("reward/accuracy", "training accuracy"), ("reward/mean", "training reward (mean)"),
                  ("eval/pass_at_1", "eval pass@1"))),
    ("entropy", (("entropy/token_mean", "token entropy (nats)"),)),
    ("kl_exact", (("kl/exact_reverse", "exact KL(π‖π_ref) per token"),
                  ("kl/exact_forward", "exact KL(π_ref‖π) per token"))),
    ("kl_estimators", (("kl/k1_mean", "k1 estimator"), ("kl/k2_mean", "k2 estimator"),
                       ("kl/k3_mean", "k3 estimator"))),
    ("diversity", (("diversity/embed_cos", "embedding cosine similarity"),
                   ("diversity/distinct_valid", "distinct valid answers / prompt"),
                   ("diversity/distinct_answers", "distinct answers / prompt"))),
)

# arm -> seed -> key -> (steps, values)
Series = Mapping[str, Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]]]


def _mplconfig() -> None:
    if "MPLCONFIGDIR" not in os.environ:
        from workers import environment

        os.environ["MPLCONFIGDIR"] = str(environment.run_dir() / "cache" / "matplotlib")
    Path(os.environ["MPLCONFIGDIR"]).mkdir(parents=True, exist_ok=True)


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


def plot_figure(series: Series, panels: Sequence[tuple[str, str]], title: str, path: Path) -> Path:
    """One PNG of len(panels) side-by-side panels; each arm is a mean line and a min–max seed band."""
    _mplconfig()
    from matplotlib.figure import Figure

    w, h = PANEL_PX
    fig = Figure(figsize=(w * len(panels) / DPI, h / DPI), dpi=DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        for k, (arm, seeds) in enumerate(series.items()):
            per_seed = [seeds[s][key] for s in seeds if key in seeds[s]]
            if not per_seed:
                continue
            steps, mean, lo, hi = seed_band(per_seed)
            color = f"C{k}"
            n = len(per_seed)
            # markers keep a metric logged once (diversity on a short run) visible
            ax.plot(steps, mean, color=color, marker="o", markersize=2.5, label=f"{arm} ({n} seed{'s' * (n > 1)})")
            if len(per_seed) > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title} — mean over seeds, band = min–max", fontsize=9)
    fig.subplots_adjust(left=0.08 / len(panels) + 0.04, right=0.98, bottom=0.14, top=0.84, wspace=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def plot_study(task: str, series: Series, out_dir: Path) -> list[Path]:
    """Every figure of FIGURES whose metrics this task logged -> out_dir/{task}_{stem}.png."""
    present = {key for seeds in series.values() for m in seeds.values() for key in m}
    written = []
    for stem, panels in FIGURES:
        keep = [p for p in panels if p[0] in present]
        if stem == "accuracy" and any(k == "reward/accuracy" for k, _ in keep):
            keep = [p for p in keep if p[0] != "reward/mean"]  # accuracy already shown
        if keep:
            written.append(plot_figure(series, keep, f"{task}: {stem}", out_dir / f"{task}_{stem}.png"))
    return written
