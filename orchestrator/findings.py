"""The report's verdict tables for one task: paired comparisons, pass@k against π_ref, and the seed
study's Key Findings re-tested with the paired verdicts (orchestrator/report.py assembles them).

Honesty rules (issue 11): with fewer than MIN_SEEDS_FOR_VERDICT seeds in an arm no p-value or verdict is
printed; a seed-study "no difference" finding is said to *agree* only when every test behind it had
POWER_TARGET power against |d_z| >= NO_DIFFERENCE_DZ, otherwise the verdict is *inconclusive* with the
power it had and the seeds it would need.

`r` is an orchestrator.report.TaskResult (arms, used trials, columns, comparisons per column title).
"""
from __future__ import annotations

import math

from orchestrator.plots import PASS_AT_K_PREFIX
from orchestrator.stats import (
    ALPHA,
    MAX_SEEDS_REPORTED,
    MIN_SEEDS_FOR_VERDICT,
    NO_DIFFERENCE_DZ,
    POWER_TARGET,
    Comparison,
    fmt_p,
    mean_ci,
    seeds_for_power,
)

DIVERSITY_COLUMNS = ("cosine similarity", "distinct valid answers", "answer entropy (nats)")
ENTROPY_COLUMN = "entropy (nats/token)"
ACCURACY_COLUMN = "final accuracy"


def _num(x: float, digits: int = 3) -> str:
    return "—" if math.isnan(x) else ("∞" if x == math.inf else "-∞" if x == -math.inf else f"{x:.{digits}g}")


def _seeds_needed(c: Comparison) -> str:
    n = c.seeds_needed()
    return "—" if math.isnan(c.dz) or c.dz == 0 else (f"> {MAX_SEEDS_REPORTED}" if n is None else str(n))


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={fmt_p(p)}"


def direction(c: Comparison) -> str:
    return f"{c.arm} {'higher' if c.diff.mean > 0 else 'lower'} than {c.ref}"


def verdict(c: Comparison, underpowered: bool) -> str:
    if underpowered or c.n < MIN_SEEDS_FOR_VERDICT:
        return f"— (fewer than {MIN_SEEDS_FOR_VERDICT} seeds)"
    return f"**{direction(c)}** ({_p(c.p_t_adj)})" if c.significant else "not significant"


def comparison_rows(r) -> list[str]:
    if all(c.n < 2 for comps in r.comparisons.values() for c in comps):
        return ["No paired comparison: no two arms share two or more seeds."]
    rows = ["| metric | comparison (arm − ref) | paired seeds | mean difference [95% CI] | d_z | t-test p (Holm) "
            "| sign-flip p (Holm) | verdict | seeds for 80% power |", "|---|---|---|---|---|---|---|---|---|"]
    for col, key in r.columns:
        for c in r.comparisons[col.title]:
            quiet = r.underpowered or c.n < MIN_SEEDS_FOR_VERDICT  # no p-values where no verdict is allowed
            diff = f"{_num(c.diff.mean)} [{_num(c.diff.lo)}, {_num(c.diff.hi)}]" if c.n >= 2 else _num(c.diff.mean)
            p_t = "—" if quiet else f"{fmt_p(c.p_t)} ({fmt_p(c.p_t_adj)})"
            p_perm = "—" if quiet else f"{fmt_p(c.p_perm)} ({fmt_p(c.p_perm_adj)})" + ("" if c.perm_exact else " MC")
            rows.append(f"| {col.title} (`{key}`) | {c.arm} − {c.ref} | {c.n} | {diff} | {_num(c.dz, 2)} | {p_t} "
                        f"| {p_perm} | {verdict(c, r.underpowered)} | {_seeds_needed(c)} |")
    return rows


def pass_at_k_section(r) -> list[str]:
    """The pass@k table: π_ref (step 0) and each arm's final eval, k = 1, 2, 4, ..."""
    if not r.ks:
        return []
    keys = [f"{PASS_AT_K_PREFIX}{k}" for k in r.ks]
    lines = ["", "### pass@k at the last eval step, against π_ref", "",
             "| policy | " + " | ".join(f"pass@{k}" for k in r.ks) + " |", "|---|" + "---|" * len(r.ks)]
    refs = [r.ref_values(key) for key in keys]
    lines.append("| π_ref (step 0) | " + " | ".join(_num(sum(v) / len(v)) if v else "—" for v in refs) + " |")
    for a in r.arms:
        cells = [mean_ci(list(r.finals(key).get(a, {}).values()), (0.0, 1.0)).format() for key in keys]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    spread = max((max(v) - min(v) for v in refs if v), default=0.0)
    if spread > 1e-9:
        lines += ["", f"Note: π_ref's step-0 pass@k differs between trials (by up to {spread:.3g}); the trials "
                      f"did not all evaluate the same π_ref on the same samples, so the row above is their mean."]
    elif not any(refs):
        lines += ["", "π_ref: no step-0 evaluation logged."]
    return lines


# --- the seed study's Key Findings -------------------------------------------------------------------

def no_difference(comps: list[Comparison], underpowered: bool) -> str:
    """Verdict on a 'no difference' finding from the comparisons behind it."""
    tested = [c for c in comps if c.testable]
    if underpowered or not tested:
        return f"untestable (fewer than {MIN_SEEDS_FOR_VERDICT} seeds per arm)"
    sig = [c for c in tested if c.significant]
    if sig:
        return "disagrees (" + "; ".join(direction(c) for c in sig) + ")"
    weakest = min(tested, key=lambda c: c.power_at(NO_DIFFERENCE_DZ))
    power = weakest.power_at(NO_DIFFERENCE_DZ)
    if power >= POWER_TARGET:
        return f"agrees (each test had ≥ {POWER_TARGET:.0%} power against an effect d_z = ±{NO_DIFFERENCE_DZ:g})"
    need = seeds_for_power(NO_DIFFERENCE_DZ, ALPHA / weakest.m)
    return (f"inconclusive: no significant difference, but only {power:.0%} power against an effect d_z = "
            f"±{NO_DIFFERENCE_DZ:g} with {weakest.n} seeds ({need} needed for {POWER_TARGET:.0%})")


def _summary(title: str, comps: list[Comparison], underpowered: bool) -> str:
    if underpowered:
        return f"{title}: no verdict (underpowered)"
    sig = [c for c in comps if c.significant]
    if sig:
        return f"{title}: " + "; ".join(f"{direction(c)} ({_p(c.p_t_adj)})" for c in sig)
    largest = max((c.dz for c in comps if not math.isnan(c.dz)), key=abs, default=float("nan"))
    return f"{title}: none significant (d_z of largest magnitude {_num(largest, 2)})"


def _accuracy(comps: list[Comparison], underpowered: bool) -> str:
    vs_none = [c for c in comps if c.ref == "none"]
    if not vs_none:
        return "untestable (no none arm)"
    if underpowered or not any(c.testable for c in vs_none):
        return f"untestable (fewer than {MIN_SEEDS_FOR_VERDICT} seeds per arm)"
    above = [c.arm for c in vs_none if c.significant and c.diff.mean > 0]
    if above:
        return f"disagrees ({', '.join(above)} higher than none)"
    if all(c.significant and c.diff.mean < 0 for c in vs_none):
        return "agrees"
    top = [c.arm for c in vs_none if c.diff.mean > 0]
    return "inconclusive (" + (f"higher mean: {', '.join(top)}" if top else "none has the highest mean") + \
        ", not significant against every KL arm)"


def findings_rows(r) -> list[str]:
    """Rows re-testing the seed study's Key Findings on one task (the seed study's README)."""
    rows = []
    comps = r.comparisons
    div = [t for t in DIVERSITY_COLUMNS if t in comps]
    if div:
        rows.append(("No consistent diversity differences between arms", ", ".join(div),
                     "; ".join(_summary(t, comps[t], r.underpowered) for t in div),
                     no_difference([c for t in div for c in comps[t]], r.underpowered)))
    if ENTROPY_COLUMN in comps:
        directions = [c for c in comps[ENTROPY_COLUMN] if c.ref != "none" and c.ref.startswith("in_loss/k3")]
        rows.append(("Entropy does not separate KL directions", "entropy, in_reward/k1 − in_loss/k3",
                     _summary(ENTROPY_COLUMN, directions, r.underpowered) if directions else "no k1 and k3 arms",
                     no_difference(directions, r.underpowered) if directions
                     else "untestable (needs in_reward/k1 and in_loss/k3 arms)"))
    if ACCURACY_COLUMN in comps:
        rows.append(("No-KL training reaches the highest training accuracy", "final accuracy, each arm − none",
                     _summary(ACCURACY_COLUMN, comps[ACCURACY_COLUMN], r.underpowered),
                     _accuracy(comps[ACCURACY_COLUMN], r.underpowered)))
    return [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
