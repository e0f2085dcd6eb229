"""orchestrator.stats: intervals, paired tests, Holm, power, and the decision rule simulated on synthetic data.

The simulations draw thousands of synthetic studies at once (fixed RNG seeds, so the numbers are
reproducible) and compare the rate of "significant" verdicts with its target, with a tolerance of
3 binomial standard deviations: a correct rule fails such a band with probability ~0.003.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from orchestrator.stats import (
    MIN_SEEDS_FOR_VERDICT,
    _sign_patterns,
    cohens_dz,
    compare,
    holm,
    mean_ci,
    paired_power,
    paired_t,
    seeds_for_power,
    sign_flip_p,
    significant,
)

STUDIES = 4000  # synthetic studies per simulation


def binomial_band(rate: float, n: int = STUDIES, sds: float = 3.0) -> tuple[float, float]:
    sd = math.sqrt(rate * (1 - rate) / n)
    return rate - sds * sd, rate + sds * sd


# --- intervals -------------------------------------------------------------------------------------

def test_mean_ci_hand_computed():
    # [1, 2, 3]: mean 2, s = 1, sem = 1/sqrt(3), t_{0.975, 2} = 4.302653
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3 and not ci.clipped
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ci.format() == "2 ± 2.48 (n=3)"


def test_mean_ci_is_clipped_to_the_metric_range():
    # accuracies 0.9, 1, 1: mean 0.9667 ± 4.3027 * 0.05774 / sqrt(3) = ± 0.1434 -> [0.823, 1.110], cut at 1
    ci = mean_ci([0.9, 1.0, 1.0], bounds=(0.0, 1.0))
    assert ci.clipped and ci.hi == 1.0 and ci.lo == pytest.approx(0.9667 - 0.1434, abs=1e-3)
    assert ci.format() == "0.967 [0.823, 1] (n=3)"
    assert not mean_ci([0.4, 0.5, 0.6], bounds=(0.0, 1.0)).clipped
    assert mean_ci([-0.9, -1.0, -1.0], bounds=(-1.0, 1.0)).lo == -1.0  # a cosine's lower bound


def test_mean_ci_one_and_no_seed():
    assert mean_ci([0.7]).format() == "0.7 (n=1, no CI)"
    assert math.isnan(mean_ci([0.7]).half_width)
    assert mean_ci([float("nan"), float("inf")]).n == 0 and mean_ci([]).format() == "—"


# --- tests on known data ----------------------------------------------------------------------------

def test_paired_t_hand_computed():
    # d = 1, 2, 3, 4: mean 2.5, sd 1.2910, t = 2.5 / (1.2910 / 2) = 3.873, df 3 -> p = 0.0305
    t, p = paired_t(np.array([1.0, 2.0, 3.0, 4.0]))
    assert t == pytest.approx(3.8730, abs=1e-4) and p == pytest.approx(0.03047, abs=1e-4)
    x, y = np.array([3.1, 4.7, 2.2, 5.9, 4.4]), np.array([2.5, 4.9, 1.1, 4.8, 3.0])
    assert paired_t(x - y)[1] == pytest.approx(sps.ttest_rel(x, y).pvalue, rel=1e-10)
    assert paired_t(np.array([0.2, 0.2, 0.2]))[1] == 0.0 and paired_t(np.zeros(3))[1] == 1.0


def test_pairing_removes_the_shared_seed_effect():
    # seeds differ a lot (1, 5, 9) but the arm is above ref by 0.1-0.2 on every seed: unpaired Welch sees
    # nothing, the paired test sees it: d = 0.1, 0.2, 0.15 -> t = 0.15 / (0.05 / sqrt 3) = 5.196, p = 0.035
    ref, arm = [1.0, 5.0, 9.0], [1.1, 5.2, 9.15]
    assert sps.ttest_ind(arm, ref, equal_var=False).pvalue > 0.9
    (c,) = compare({"a": dict(zip("012", arm)), "none": dict(zip("012", ref))}, [("a", "none")])
    assert c.p_t == pytest.approx(0.0351, abs=1e-4) and c.significant
    assert c.diff.mean == pytest.approx(0.15) and c.dz == pytest.approx(3.0)


def test_sign_flip_exact_hand_computed():
    # 1, 2, 3: the 8 signed sums are ±6, ±4, ±2, 0, 0; |sum| >= 6 in 2 of 8 -> p = 0.25
    p, exact = sign_flip_p(np.array([1.0, 2.0, 3.0]))
    assert exact and p == pytest.approx(0.25)
    assert sign_flip_p(np.ones(6))[0] == pytest.approx(2 / 64)  # the smallest p with 6 pairs
    assert sign_flip_p(np.array([1.0, -1.0, 1.0, -1.0]))[0] == 1.0
    # vectorised over rows; row 2 observes |1 - 2 + 3| = 2, reached by ±6, ±4, ±2: 6 of 8 patterns
    batch, _ = sign_flip_p(np.array([[1.0, 2.0, 3.0], [1.0, -2.0, 3.0]]))
    assert batch.tolist() == pytest.approx([0.25, 0.75])


def test_sign_flip_monte_carlo_agrees_with_exact_enumeration():
    d = np.random.default_rng(3).normal(0.4, 1.0, size=17)  # 17 pairs: Monte Carlo path
    p_mc, exact = sign_flip_p(d)
    assert not exact
    signs = _sign_patterns(17)  # 131,072 patterns: the exact answer, enumerated here
    p_exact = float(np.mean(np.abs(signs @ d) >= abs(d.sum()) * (1 - 1e-9)))
    assert p_mc == pytest.approx(p_exact, abs=4 * math.sqrt(p_exact * (1 - p_exact) / 20_000) + 1e-4)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = holm([0.2, float("nan"), 0.01])
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    np.testing.assert_allclose(holm(np.array([[0.01, 0.04, 0.03], [0.5, 0.01, 0.02]])),
                               [[0.03, 0.06, 0.06], [0.5, 0.03, 0.04]])
    assert holm([]).shape == (0,)


# --- effect size and power ------------------------------------------------------------------------------

def test_cohens_dz():
    assert cohens_dz([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.5 / 1.2909944)
    assert cohens_dz([0.3, 0.3]) == math.inf and cohens_dz([0.0, 0.0]) == 0.0 and math.isnan(cohens_dz([1.0]))


def test_power_matches_published_values():
    # G*Power 3.1, "difference between two dependent means", two-tailed alpha 0.05: d_z = 0.5 needs 34 pairs
    # (actual power 0.8078); d_z = 1.0 needs 10 (0.8031).
    assert paired_power(0.5, 34) == pytest.approx(0.8078, abs=1e-4)
    assert paired_power(1.0, 10) == pytest.approx(0.8031, abs=1e-4)
    assert paired_power(-1.0, 10) == paired_power(1.0, 10)
    assert seeds_for_power(0.5) == 34 and seeds_for_power(1.0) == 10 and seeds_for_power(-1.0) == 10
    assert seeds_for_power(1.0, alpha=0.05 / 3) == 14  # Holm's first level with 3 comparisons
    assert seeds_for_power(0.0) is None and seeds_for_power(0.01) is None  # > 1000 seeds
    assert seeds_for_power(math.inf) == 2 and seeds_for_power(float("nan")) is None
    # large effects: finite and rising in n (scipy's nct lower tail is NaN there; see paired_power)
    for dz in (3.0, 5.5, 7.1, 11.0):
        power = paired_power(dz, np.arange(2, 40))
        assert np.isfinite(power).all() and (np.diff(power) >= -1e-12).all()
    assert seeds_for_power(5.5) == 3 and paired_power(5.5, 2) < 0.8 < paired_power(5.5, 3)


# --- the decision rule, simulated ------------------------------------------------------------------------

def null_studies(rng, n_seeds: int) -> np.ndarray:
    """(STUDIES, 3, n) differences of the three comparisons of a 3-arm study with no arm effect:
    k1 - none, k3 - none, k1 - k3, from per-seed values = a large shared seed effect + arm noise."""
    seed_effect = rng.normal(0.0, 3.0, size=(STUDIES, 1, n_seeds))
    none, k1, k3 = seed_effect + rng.normal(0.0, 1.0, size=(STUDIES, 3, n_seeds)).transpose(1, 0, 2)[:, :, None, :]
    return np.concatenate([k1 - none, k3 - none, k1 - k3], axis=1)


def test_false_positive_rate_on_null_data_is_alpha():
    rng = np.random.default_rng(20261125)
    one = significant(rng.normal(0.0, 1.0, size=(STUDIES, 1, 6)))[:, 0]  # one comparison: rate = alpha
    lo, hi = binomial_band(0.05)
    assert lo <= one.mean() <= hi
    family = significant(null_studies(rng, 6))  # Holm over the 3 comparisons: any false verdict <= alpha
    fwer = family.any(axis=1).mean()
    assert binomial_band(0.05)[0] - 0.02 <= fwer <= hi  # correlated comparisons make Holm a little conservative
    assert family.mean() <= hi / 3 + 0.01  # per comparison
    p_perm, exact = sign_flip_p(rng.normal(0.0, 1.0, size=(STUDIES, 8)))  # exact test: level <= alpha
    assert exact and (p_perm < 0.05).mean() <= hi


def test_power_on_a_known_effect_matches_the_noncentral_t():
    rng = np.random.default_rng(7)
    for dz, n in ((1.0, 8), (0.8, 12), (1.5, 4)):
        observed = significant(rng.normal(dz, 1.0, size=(STUDIES, 1, n)))[:, 0].mean()
        lo, hi = binomial_band(paired_power(dz, n))
        assert lo <= observed <= hi, (dz, n, observed, paired_power(dz, n))


def test_no_verdict_below_the_minimum_seeds():
    huge = np.full((10, 1, MIN_SEEDS_FOR_VERDICT - 1), 5.0) + np.random.default_rng(0).normal(0, 0.01, (10, 1, 2))
    assert not significant(huge).any()
    (c,) = compare({"a": {"0": 5.0, "1": 5.1}, "none": {"0": 0.0, "1": 0.0}}, [("a", "none")])
    assert c.n == 2 and not c.testable and not c.significant


def test_compare_pairs_by_seed_and_matches_the_vectorised_rule():
    rng = np.random.default_rng(11)
    for _ in range(50):  # random 3-arm studies, some seeds missing: compare() == significant() on its pairs
        vals = {arm: {str(s): float(v) for s, v in enumerate(rng.normal(0.7 if arm == "k1" else 0, 1, 6))}
                for arm in ("none", "k1", "k3")}
        del vals["k3"]["5"]  # k3 lacks seed 5: its comparisons use 5 pairs
        pairs = [("k1", "none"), ("k3", "none"), ("k1", "k3")]
        comps = compare(vals, pairs)
        assert [c.n for c in comps] == [6, 5, 5] and all(c.m == 3 for c in comps)
        d = [np.array([vals[a][s] - vals[r][s] for s in c.seeds]) for (a, r), c in zip(pairs, comps)]
        raw = [float(paired_t(x)[1]) for x in d]
        assert [c.p_t_adj for c in comps] == pytest.approx(holm(raw).tolist())
        assert [c.significant for c in comps] == (holm(raw) < 0.05).tolist()


def test_compare_difference_interval_is_clipped_to_the_difference_range():
    (c,) = compare({"a": {"0": 1.0, "1": 1.0, "2": 0.9}, "none": {"0": 0.0, "1": 0.1, "2": 0.0}}, [("a", "none")],
                   bounds=(0.0, 1.0))
    assert c.diff.hi <= 1.0 and c.diff.lo >= -1.0 and c.diff.clipped
