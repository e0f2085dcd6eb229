"""Across-seed statistics for the study report: intervals, paired arm comparisons, power.

Each trial contributes one number per metric (its "final" value, see orchestrator/report.py), so an
arm is a small sample of seeds. Trials of different arms that share a seed share their prompts and
vLLM's sampling seeds (common random numbers), so arms are compared **paired by seed**: for a
comparison (arm vs ref) the data are the per-seed differences d_i = x_arm(seed i) - x_ref(seed i), and
the seed-to-seed noise both arms share cancels out of d.

For each comparison:
- mean difference and its 95% Student-t CI: mean(d) ± t_{0.975, n-1} sd(d) / sqrt(n);
- the paired t-test (two-sided), which decides the verdict;
- a sign-flip permutation test (Fisher 1935): under the null, each d_i is as likely to be -d_i, so the
  p-value is the share of the 2^n sign patterns whose |mean| reaches the observed one (exact for
  n <= EXACT_MAX_PAIRS, Monte Carlo with a fixed RNG seed beyond). It assumes symmetry, not
  normality, and is shown beside the t-test as a check; its smallest attainable p is 2 / 2^n, so it
  can only corroborate a t-test verdict from 6 pairs on (2 / 64 = 0.031);
- Holm's step-down adjustment (Holm 1979) over the comparisons of one metric, for both tests;
- Cohen's d_z = mean(d) / sd(d) (the standardised paired effect, Cohen 1988);
- power of the paired t-test from the noncentral t: with df = n - 1 and noncentrality d_z sqrt(n),
  power = P(|T| > t_{1-a/2, df}); the seeds needed for POWER_TARGET at the observed d_z use
  a = ALPHA / m (m comparisons: the level Holm applies to the smallest p), a conservative choice.

The core functions take arrays of shape (..., n) (one row per comparison or per simulated study), so
the unit tests can check the false-positive rate and the power of this exact decision rule over
thousands of synthetic studies in well under a second.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
CONFIDENCE = 0.95
POWER_TARGET = 0.80
MIN_SEEDS_FOR_VERDICT = 3  # fewer paired seeds: the report prints no significance verdict
EXACT_MAX_PAIRS = 16  # 2^16 = 65,536 sign patterns; beyond it, Monte Carlo
PERMUTATION_DRAWS = 20_000
PERMUTATION_SEED = 0
MAX_SEEDS_REPORTED = 1000  # "seeds needed" beyond this is written as "> 1000"
# The effect a "no difference" finding must have been able to see: a study "agrees" with such a finding
# only if each of its tests had POWER_TARGET power against |d_z| >= this, i.e. a mean paired difference
# as large as the seed-to-seed SD of the differences (a large effect by Cohen's conventions).
NO_DIFFERENCE_DZ = 1.0

Bounds = tuple[float | None, float | None]
UNBOUNDED: Bounds = (None, None)


# --- intervals -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """Mean of n values with its CI [lo, hi]; `clipped` when the t interval crossed a bound of the
    metric's range and was cut there (NaN bounds when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int
    clipped: bool = False

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}g} (n=1, no CI)"
        if self.clipped:
            return f"{self.mean:.{digits}g} [{self.lo:.{digits}g}, {self.hi:.{digits}g}] (n={self.n})"
        return f"{self.mean:.{digits}g} ± {self.half_width:.{digits}g} (n={self.n})"


def finite(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def mean_ci(values: Sequence[float], bounds: Bounds = UNBOUNDED, confidence: float = CONFIDENCE) -> Interval:
    """Mean with its Student-t interval, clipped to `bounds` (the metric's range, e.g. (0, 1) for an
    accuracy): a mean of values in [0, 1] cannot lie outside [0, 1], so an interval reaching past a
    bound carries no information there. Non-finite values are dropped."""
    x = finite(values)
    n = len(x)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    if n == 1:
        return Interval(float(x[0]), float("nan"), float("nan"), 1)
    sd = 0.0 if _flat(x) else float(x.std(ddof=1))  # float noise (1e-17) is no spread
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    return _clip(float(x.mean()), float(x.mean()) - half, float(x.mean()) + half, n, bounds)


def _flat(x: np.ndarray) -> np.ndarray:
    """Along the last axis: is the spread float noise (1e-12 relative) rather than data?"""
    return x.std(-1, ddof=1) <= 1e-12 * np.maximum(1.0, np.abs(x).max(-1))


def _clip(mean: float, lo: float, hi: float, n: int, bounds: Bounds) -> Interval:
    b_lo = -math.inf if bounds[0] is None else bounds[0]
    b_hi = math.inf if bounds[1] is None else bounds[1]
    clipped = lo < b_lo or hi > b_hi
    return Interval(mean, max(lo, b_lo), min(hi, b_hi), n, clipped)


def difference_bounds(bounds: Bounds) -> Bounds:
    """Range of x - y for x, y in `bounds`: [lo - hi, hi - lo] (unbounded if either end is)."""
    lo, hi = bounds
    return (None, None) if lo is None or hi is None else (lo - hi, hi - lo)


# --- vectorised tests (arrays of shape (..., n): the last axis is the pairs) ------------------------

def paired_t(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t, two-sided p) of the paired t-test on differences d (..., n), n >= 2.

    Zero variance (up to float noise) leaves t undefined: a zero mean gives p = 1 and a non-zero mean
    p = 0 (every seed moved the same way by the same amount), rather than scipy's NaN.
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    mean, sd, flat = d.mean(-1), d.std(-1, ddof=1), _flat(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(flat, np.where(np.abs(mean) > 0, np.sign(mean) * np.inf, 0.0), mean / sd * math.sqrt(n))
    p = np.where(flat, np.where(np.abs(mean) > 0, 0.0, 1.0), 2 * sps.t.sf(np.abs(t), n - 1))
    return t, p


def _sign_patterns(n: int) -> np.ndarray:
    """(2^n, n) every vector of +-1: row r's bit j gives the sign of pair j."""
    bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
    return 1.0 - 2.0 * bits


def sign_flip_p(d: np.ndarray, draws: int = PERMUTATION_DRAWS, seed: int = PERMUTATION_SEED) -> tuple[np.ndarray, bool]:
    """(two-sided p, exact?) of the sign-flip permutation test of mean(d) = 0, d of shape (..., n).

    Exact: p = #{sign patterns s : |mean(s * d)| >= |mean(d)|} / 2^n (the observed pattern included).
    Monte Carlo (n > EXACT_MAX_PAIRS): p = (1 + #{draws reaching it}) / (1 + draws), which keeps the
    test valid (Phipson & Smyth 2010). Ties count as reaching (a relative 1e-9 tolerance for float noise).
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    exact = n <= EXACT_MAX_PAIRS
    signs = _sign_patterns(n) if exact else \
        np.where(np.random.default_rng(seed).random((draws, n)) < 0.5, -1.0, 1.0)
    observed = np.abs(d.sum(-1))  # (...)
    flipped = np.abs(np.einsum("pn,...n->...p", signs, d))  # (..., patterns)
    reach = (flipped >= observed[..., None] * (1 - 1e-9) - 1e-300).sum(-1)
    p = reach / len(signs) if exact else (1 + reach) / (1 + draws)
    return np.minimum(p, 1.0), exact


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values along the last axis (..., m); NaN stays NaN and is not counted.

    Sorted ascending, p_(r) (r = 0..m'-1 among the m' non-NaN ones) becomes max_{j<=r} min(1, (m'-j) p_(j)).
    """
    p = np.asarray(p, dtype=float)
    nan = np.isnan(p)
    m = (~nan).sum(-1, keepdims=True)
    order = np.argsort(np.where(nan, np.inf, p), axis=-1)
    ranked = np.take_along_axis(np.where(nan, 0.0, p), order, -1)  # NaNs sort last and cannot raise a max
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(p.shape[-1])) * ranked), axis=-1)
    out = np.empty_like(p)
    np.put_along_axis(out, order, adjusted, -1)
    return np.where(nan, np.nan, out)


def significant(d: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The report's decision rule on differences d (..., m, n) of m comparisons with n pairs each:
    Holm-adjusted paired-t p < alpha, and never with fewer than MIN_SEEDS_FOR_VERDICT pairs."""
    d = np.asarray(d, dtype=float)
    if d.shape[-1] < MIN_SEEDS_FOR_VERDICT:
        return np.zeros(d.shape[:-1], dtype=bool)
    return holm(paired_t(d)[1]) < alpha


# --- effect size and power -----------------------------------------------------------------------

def cohens_dz(d: Sequence[float]) -> float:
    """mean(d) / sd(d): Cohen's d_z of paired differences (±inf when every pair differs by the same
    non-zero amount, 0 when all are 0; NaN below 2 pairs)."""
    d = finite(d)
    if len(d) < 2:
        return float("nan")
    if _flat(d):
        return 0.0 if d.mean() == 0 else math.copysign(math.inf, float(d.mean()))
    return float(d.mean()) / float(d.std(ddof=1))


def paired_power(dz, n, alpha: float = ALPHA):
    """Power of the two-sided paired t-test at level alpha with n pairs against a true effect d_z:
    P(|T| > t_{1-alpha/2, n-1}) for T ~ noncentral t(df = n - 1, nc = d_z sqrt(n)). Broadcasts."""
    dz, n = np.asarray(dz, dtype=float), np.asarray(n, dtype=float)
    df = n - 1
    crit = sps.t.ppf(1 - alpha / 2, df)
    nc = np.abs(dz) * np.sqrt(n)
    # P(T < -crit) as P(T' > crit) for T' ~ nct(df, -nc): scipy's nct.cdf(-crit, df, nc) is NaN far in the tail
    power = sps.nct.sf(crit, df, nc) + sps.nct.sf(crit, df, -nc)
    power = np.where(np.isinf(dz), 1.0, power)
    return float(power) if power.ndim == 0 else power


def seeds_for_power(dz: float, alpha: float = ALPHA, target: float = POWER_TARGET) -> int | None:
    """Smallest number of paired seeds n >= 2 whose paired t-test reaches `target` power at effect d_z,
    or None when it takes more than MAX_SEEDS_REPORTED (or d_z is 0 / NaN)."""
    if math.isnan(dz) or dz == 0:
        return None
    if math.isinf(dz):
        return 2
    n = np.arange(2, MAX_SEEDS_REPORTED + 1)
    ok = np.flatnonzero(paired_power(dz, n, alpha) >= target)
    return int(n[ok[0]]) if len(ok) else None


# --- one metric of one study ----------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """arm vs ref on one metric, paired by seed (d = arm - ref)."""

    arm: str
    ref: str
    seeds: tuple[str, ...]  # the paired seeds (both arms have a final value)
    diff: Interval  # mean difference and its 95% CI (clipped to the metric's difference range)
    t: float
    p_t: float
    p_perm: float
    perm_exact: bool
    dz: float
    p_t_adj: float = float("nan")  # Holm over the metric's comparisons
    p_perm_adj: float = float("nan")
    m: int = 1  # comparisons of this metric (for the power level ALPHA / m)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def testable(self) -> bool:
        return self.n >= MIN_SEEDS_FOR_VERDICT and not math.isnan(self.p_t_adj)

    @property
    def significant(self) -> bool:
        return self.testable and self.p_t_adj < ALPHA

    @property
    def power_alpha(self) -> float:
        return ALPHA / self.m

    def seeds_needed(self) -> int | None:
        """Paired seeds for POWER_TARGET power at the observed d_z and level ALPHA / m."""
        return seeds_for_power(self.dz, self.power_alpha)

    def power_at(self, dz: float) -> float:
        """Power this comparison had (n pairs, level ALPHA / m) against a true effect d_z."""
        return paired_power(dz, self.n, self.power_alpha) if self.n >= 2 else 0.0


def compare(finals: Mapping[str, Mapping[str, float]], pairs: Sequence[tuple[str, str]],
            bounds: Bounds = UNBOUNDED) -> list[Comparison]:
    """Paired comparisons of one metric: finals is arm -> seed -> final value; pairs lists (arm, ref).
    p-values are Holm-adjusted over the comparisons that have 2+ pairs."""
    out = []
    for arm, ref in pairs:
        a, r = finals.get(arm, {}), finals.get(ref, {})
        seeds = tuple(s for s in a if s in r and math.isfinite(a[s]) and math.isfinite(r[s]))
        d = np.array([a[s] - r[s] for s in seeds])
        if len(d) < 2:
            mean = float(d.mean()) if len(d) else float("nan")
            out.append(Comparison(arm, ref, seeds, Interval(mean, math.nan, math.nan, len(d)),
                                  math.nan, math.nan, math.nan, False, math.nan))
            continue
        t, p = paired_t(d)
        p_perm, exact = sign_flip_p(d)
        diff = mean_ci(d, difference_bounds(bounds))
        out.append(Comparison(arm, ref, seeds, diff, float(t), float(p), float(p_perm), exact, cohens_dz(d)))
    m = sum(not math.isnan(c.p_t) for c in out)
    adj_t, adj_perm = holm([c.p_t for c in out]), holm([c.p_perm for c in out])
    return [replace(c, p_t_adj=float(pt), p_perm_adj=float(pp), m=max(m, 1)) for c, pt, pp in zip(out, adj_t, adj_perm)]


def fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.2g}")
