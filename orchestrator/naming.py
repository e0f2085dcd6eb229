"""Names of a study's trials: a short one for MLflow's run-name column and the progress lines, a long one
for the record (MLflow tag `klrl.long_name`).

    short_trial_name   'none s0', 'k1·reward s1', 'k3·loss s2', 'k1·reward s0 kl_coef=0.1'
    long_trial_name    'reverse_k1_in_reward seed=1' (the grid labels as the study file writes them)

The short name is built from the trial's config (the arm from kl_mode and kl_estimator, then the seed), so
it reads the same in every study whatever its bundles are called; every other setting the study varies
(a grid value or an Optuna sample) follows as a `field=value` suffix, so no two trials share a name.
"""
from __future__ import annotations

from typing import Any

from core.config import flatten

ARM_FIELDS = ("algorithm.kl_mode", "algorithm.kl_estimator")
SEED_FIELD = "run.seed"
PLACEMENT = {"in_reward": "reward", "in_loss": "loss"}  # where the KL term goes
GENERIC_LEAVES = ("name", "path")  # 'task.name' reads better as 'task=...'


def arm_label(kl_mode: str, kl_estimator: str) -> str:
    """'none', or '{estimator}·{reward|loss}' (e.g. 'k1·reward'): the estimator and where the KL acts."""
    return "none" if kl_mode == "none" else f"{kl_estimator}·{PLACEMENT.get(kl_mode, kl_mode)}"


def short_trial_name(study, labels: dict[str, str], sampled: dict[str, Any] | None = None) -> str:
    """'{arm} s{seed}' then ' field=value' for each other setting that varies between the study's trials."""
    config = study.trial_config(labels, sampled)
    values = flatten(config.to_dict())
    parts = [arm_label(config.algorithm.kl_mode, config.algorithm.kl_estimator), f"s{config.run.seed}"]
    parts += [f"{field_label(key)}={format_value(values[key])}" for key in varied_fields(study, sampled)]
    return " ".join(parts)


def long_trial_name(study, labels: dict[str, str], sampled: dict[str, Any] | None = None) -> str:
    """The grid labels as written in the study file (e.g. 'reverse_k1_in_reward seed=1'), then the sampled
    values (e.g. 'kl_coef=0.007036')."""
    suffixes = [f"{field_label(k)}={format_value(v)}" for k, v in sorted((sampled or {}).items())]
    return " ".join([study.trial_name(labels), *suffixes])


def varied_fields(study, sampled: dict[str, Any] | None = None) -> list[str]:
    """Dotted fields, beyond the arm and the seed, that tell two trials apart: a field axis, a field whose value
    differs between bundles of a bundle axis that set the same arm (a setting that comes with its arm, such
    as the k3 arm's kl_clamp, is named by the arm already), an Optuna parameter."""
    fields: list[str] = []
    for axis in study.axes:
        by_arm: dict[str, list[dict]] = {}
        for bundle in axis.bundles:
            by_arm.setdefault(repr([bundle.get(k) for k in ARM_FIELDS]), []).append(bundle)
        for key in dict.fromkeys(k for bundle in axis.bundles for k in bundle):
            varies = any(len({repr(b.get(key)) for b in group}) > 1 for group in by_arm.values())
            if key not in (*ARM_FIELDS, SEED_FIELD) and varies and key not in fields:
                fields.append(key)
    for key in sorted(sampled or {}):
        if key not in (*ARM_FIELDS, SEED_FIELD) and key not in fields:
            fields.append(key)
    return fields


def field_label(key: str) -> str:
    """'algorithm.kl_coef' -> 'kl_coef'; 'task.name' -> 'task'."""
    section, _, leaf = key.rpartition(".")
    return section.rsplit(".", 1)[-1] if leaf in GENERIC_LEAVES and section else leaf


def format_value(value: Any) -> str:
    """Floats to 4 significant digits (an Optuna sample 0.00703573702872215 -> 0.007036); else as is."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(value)
