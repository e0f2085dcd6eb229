"""Across-seed statistics for the study report: t-based confidence intervals and arm comparisons.

Each trial contributes one number per metric (its "final" value, see orchestrator/report.py), so an
arm is a small sample of seeds. Differences between arms are judged with Welch's unequal-variance
t-test (Welch 1947) between every pair of arms, and the pairwise p-values of one metric are adjusted
with Holm's step-down method (Holm 1979) so that three arms (three pairs) are not three chances at a
false "significant". The verdict names the test, the adjusted p-values and the seeds per arm.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05


@dataclass(frozen=True)
class Interval:
    """Mean of n values with the half-width of its t-based CI (NaN when n < 2)."""

    mean: float
    half_width: float
    n: int

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}g} (n=1, no CI)"
        return f"{self.mean:.{digits}g} ± {self.half_width:.{digits}g} (n={self.n})"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n) (Student t interval); NaN values are dropped."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    if n == 1:
        return Interval(float(x[0]), float("nan"), 1)
    sem = x.std(ddof=1) / math.sqrt(n)
    return Interval(float(x.mean()), float(sps.t.ppf(0.5 + confidence / 2, n - 1) * sem), n)


def _flat(x: np.ndarray) -> bool:
    return float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.abs(x).max()))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value; NaN with fewer than 2 values on a side.

    With zero variance (up to float noise) on both sides the t statistic is undefined: equal means give
    p=1 and unequal means p=0 (a deterministic difference), rather than scipy's NaN.
    """
    a = np.asarray([v for v in a if not math.isnan(v)], dtype=float)
    b = np.asarray([v for v in b if not math.isnan(v)], dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if _flat(a) and _flat(b):  # float noise (1e-17) would otherwise give a meaningless t
        return 1.0 if math.isclose(a.mean(), b.mean(), rel_tol=1e-9, abs_tol=1e-12) else 0.0
    with warnings.catch_warnings():  # scipy warns on a nearly flat side; Welch handles it fine
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given); NaN stays NaN and is not counted."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))  # step-down keeps monotonicity
        out[i] = running
    return out


@dataclass(frozen=True)
class Comparison:
    """One pair of arms on one metric."""

    a: str
    b: str
    mean_a: float
    mean_b: float
    p: float  # raw Welch p
    p_adj: float  # Holm-adjusted over the metric's pairs

    @property
    def significant(self) -> bool:
        return not math.isnan(self.p_adj) and self.p_adj < ALPHA

    def phrase(self) -> str:
        hi, lo = (self.a, self.b) if self.mean_a > self.mean_b else (self.b, self.a)
        return f"{lo} lower than {hi} (p={_fmt_p(self.p_adj)})"


@dataclass(frozen=True)
class Verdict:
    """The pairwise comparisons of one metric and their plain-language summary."""

    comparisons: tuple[Comparison, ...]
    text: str
    testable: bool  # False when no pair had 2+ seeds on both sides

    @property
    def any_significant(self) -> bool:
        return any(c.significant for c in self.comparisons)

    def best(self) -> str | None:
        """The arm significantly above every other arm, if there is one."""
        arms = {c.a for c in self.comparisons} | {c.b for c in self.comparisons}
        for arm in sorted(arms):
            wins = [c for c in self.comparisons if arm in (c.a, c.b)]
            if wins and all(c.significant and (c.mean_a if c.a == arm else c.mean_b) >
                            (c.mean_b if c.a == arm else c.mean_a) for c in wins):
                return arm
        return None


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.2g}")


def _seeds_phrase(finals: Mapping[str, Sequence[float]]) -> str:
    counts = sorted({len([v for v in vs if not math.isnan(v)]) for vs in finals.values()})
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per arm"
    return "seeds per arm: " + ", ".join(f"{arm}={len(vs)}" for arm, vs in finals.items())


def compare_arms(finals: Mapping[str, Sequence[float]]) -> Verdict:
    """Welch t-test between every pair of arms, Holm-adjusted, summarised in one sentence.

    finals: arm -> per-seed final values. Examples of the text:
      "no significant difference between arms (Welch t, Holm-adjusted, smallest p=0.41, 3 seeds per arm)"
      "none highest: in_reward/k1 lower than none (p=0.003); ... (Welch t, Holm-adjusted, 3 seeds per arm)"
    """
    arms = [a for a in finals if any(not math.isnan(v) for v in finals[a])]
    pairs = list(itertools.combinations(arms, 2))
    raw = [welch_p(finals[a], finals[b]) for a, b in pairs]
    adj = holm(raw)
    means = {a: mean_ci(finals[a]).mean for a in arms}
    comps = tuple(Comparison(a, b, means[a], means[b], p, q) for (a, b), p, q in zip(pairs, raw, adj))
    testable = any(not math.isnan(p) for p in raw)
    how = f"Welch t, Holm-adjusted, {_seeds_phrase({a: finals[a] for a in arms})}"
    if len(arms) < 2:
        text = "only one arm; nothing to compare"
    elif not testable:
        text = f"not testable: a t-test needs 2+ seeds per arm ({_seeds_phrase(finals)})"
    else:
        verdict = Verdict(comps, "", True)
        sig = [c for c in comps if c.significant]
        if not sig:
            smallest = min(p for p in adj if not math.isnan(p))
            text = f"no significant difference between arms ({how}, smallest p={_fmt_p(smallest)})"
        else:
            best = verdict.best()
            lead = f"{best} highest: " if best else ""
            text = f"{lead}{'; '.join(c.phrase() for c in sig)} ({how}; other pairs not significant)" \
                if len(sig) < len(comps) else f"{lead}{'; '.join(c.phrase() for c in sig)} ({how})"
    return Verdict(comps, text, testable)
