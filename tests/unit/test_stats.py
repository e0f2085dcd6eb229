"""orchestrator.stats: t intervals, Welch p-values, Holm adjustment and verdict text on known data."""
from __future__ import annotations

import math

import pytest

from orchestrator.stats import compare_arms, holm, mean_ci, welch_p


def test_mean_ci_hand_computed():
    # [1, 2, 3]: mean 2, s = 1, sem = 1/sqrt(3), t_{0.975, 2} = 4.302653
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ci.format() == "2 ± 2.48 (n=3)"


def test_mean_ci_one_and_no_seed():
    assert mean_ci([0.7]).format() == "0.7 (n=1, no CI)"
    assert math.isnan(mean_ci([0.7]).half_width)
    assert mean_ci([float("nan")]).n == 0 and mean_ci([]).format() == "—"


def test_welch_p_known_value():
    # By hand: s_a^2/n_a = 1.6667/4, s_b^2/n_b = 10/5 -> se = 1.5546, t = -3.5/se = -2.2514,
    # Welch-Satterthwaite df = 2.4167^2 / ((0.41667^2)/3 + 2^2/4) = 5.521 -> two-sided p = 0.0691.
    from scipy.stats import t as student_t

    se = math.sqrt(1.6666667 / 4 + 10 / 5)
    df = (1.6666667 / 4 + 10 / 5) ** 2 / ((1.6666667 / 4) ** 2 / 3 + (10 / 5) ** 2 / 4)
    assert df == pytest.approx(5.521, abs=1e-3)
    expected = 2 * student_t.sf(3.5 / se, df)
    assert expected == pytest.approx(0.0691, abs=1e-4)
    assert welch_p([1, 2, 3, 4], [2, 4, 6, 8, 10]) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(welch_p([1.0], [1.0, 2.0]))
    assert welch_p([1, 1], [1, 1]) == 1.0 and welch_p([1, 1], [2, 2]) == 0.0


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = holm([0.2, float("nan"), 0.01])
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)


def test_verdict_one_arm_clearly_higher():
    v = compare_arms({"none": [0.90, 0.91, 0.92], "in_reward/k1": [0.50, 0.51, 0.49],
                      "in_loss/k3": [0.50, 0.49, 0.51]})
    assert v.best() == "none" and v.testable
    assert "none highest" in v.text and "in_reward/k1 lower than none" in v.text
    assert "in_loss/k3 lower than none" in v.text and "3 seeds per arm" in v.text
    assert "Welch t, Holm-adjusted" in v.text
    pair = next(c for c in v.comparisons if {c.a, c.b} == {"in_reward/k1", "in_loss/k3"})
    assert not pair.significant and pair.p == pytest.approx(1.0)


def test_verdict_no_difference():
    v = compare_arms({"none": [0.1, 0.2, 0.3], "in_reward/k1": [0.15, 0.25, 0.2]})
    assert not v.any_significant and v.best() is None
    assert v.text.startswith("no significant difference between arms (Welch t, Holm-adjusted, 3 seeds")


def test_verdict_untestable_with_one_seed():
    v = compare_arms({"none": [0.9], "in_loss/k3": [0.1]})
    assert not v.testable and "not testable" in v.text and "1 seed per arm" in v.text
