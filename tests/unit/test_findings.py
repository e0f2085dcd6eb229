"""orchestrator.findings: the seed-study verdicts from paired comparisons (no MLflow: comparisons built here)."""
from __future__ import annotations

import numpy as np

from orchestrator.findings import _accuracy as accuracy_verdict
from orchestrator.findings import no_difference, verdict
from orchestrator.stats import compare


def study(effects: dict[str, float], n_seeds: int, rng_seed: int = 0) -> dict[str, dict[str, float]]:
    """arm -> seed -> value: a shared seed effect, arm noise of SD 1 and the arm's shift."""
    rng = np.random.default_rng(rng_seed)
    seed_effect = rng.normal(0, 5, n_seeds)
    return {arm: {str(s): float(seed_effect[s] + shift + rng.normal(0, 1)) for s in range(n_seeds)}
            for arm, shift in effects.items()}


PAIRS = [("k1", "none"), ("k3", "none")]


def test_no_difference_agrees_only_with_enough_power():
    # 20 seeds, no effect: Holm level 0.05/2 -> power against d_z = 1 is 0.97 >= 0.8, and nothing is significant
    comps = compare(study({"none": 0, "k1": 0, "k3": 0}, 20, rng_seed=1), PAIRS)
    assert not any(c.significant for c in comps)
    assert no_difference(comps, underpowered=False).startswith("agrees (each test had ≥ 80% power against an effect")
    # the same null study with 5 seeds: nothing significant either, but far too little power to agree
    few = compare(study({"none": 0, "k1": 0, "k3": 0}, 5, rng_seed=1), PAIRS)
    assert not any(c.significant for c in few)
    text = no_difference(few, underpowered=False)
    assert text.startswith("inconclusive: no significant difference, but only ") and "(13 needed for 80%)" in text
    assert no_difference(few, underpowered=True) == "untestable (fewer than 3 seeds per arm)"


def test_no_difference_disagrees_on_a_significant_comparison():
    comps = compare(study({"none": 0, "k1": 3.0, "k3": 0}, 8), PAIRS)
    assert comps[0].significant and verdict(comps[0], False).startswith("**k1 higher than none** (p")
    assert no_difference(comps, underpowered=False) == "disagrees (k1 higher than none)"
    assert verdict(comps[0], underpowered=True) == "— (fewer than 3 seeds)"


def test_accuracy_finding():
    assert accuracy_verdict(compare(study({"none": 0, "k1": -3, "k3": -3}, 8), PAIRS), False) == "agrees"
    assert accuracy_verdict(compare(study({"none": 0, "k1": 3, "k3": -3}, 8), PAIRS), False) \
        == "disagrees (k1 higher than none)"
    mixed = accuracy_verdict(compare(study({"none": 0, "k1": -3, "k3": 0.0}, 8, rng_seed=2), PAIRS), False)
    assert mixed.startswith("inconclusive (") and mixed.endswith("not significant against every KL arm)")
    assert accuracy_verdict(compare(study({"k1": 0, "k3": 0}, 8), [("k1", "k3")]), False) == "untestable (no none arm)"
