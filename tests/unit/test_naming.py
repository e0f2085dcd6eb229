"""Trial names: short ones that fit MLflow's run-name column, unique within a study; long ones as written."""
from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.naming import field_label, long_trial_name, short_trial_name
from orchestrator.search_space import load_study

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
ARMS = [{"name": "none", "algorithm.kl_mode": "none"},
        {"name": "reverse_k1_in_reward", "algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k1"},
        {"name": "k3_in_loss", "algorithm.kl_mode": "in_loss", "algorithm.kl_estimator": "k3",
         "algorithm.kl_clamp": 10.0}]  # a setting that comes with its arm: not a suffix


def study_from(tmp_path, grid: dict, **extra):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": {"run": {"steps": 2}}, "grid": grid, **extra}))
    return load_study(path)


def test_miniature_trials_get_the_arm_and_seed_only():
    study = load_study(SPACES / "miniature.yaml")
    names = [short_trial_name(study, labels) for labels in study.grid()]
    assert names == ["none s0", "none s1", "k1·reward s0", "k1·reward s1", "k3·loss s0", "k3·loss s1"]
    assert max(len(n) for n in names) <= 14  # fits MLflow's default run-name column
    assert long_trial_name(study, study.grid()[3]) == "reverse_k1_in_reward seed=1"


def test_other_axes_become_suffixes_and_names_stay_unique(tmp_path):
    arms = ARMS + [{"name": "k1_strong", "algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k1",
                    "algorithm.kl_coef": 0.5}]
    study = study_from(tmp_path, {"arms": arms, "learner.lr": [1.0e-5, 3.0e-5], "run.seed": [2]})
    names = [short_trial_name(study, labels) for labels in study.grid()]
    assert len(set(names)) == len(names), names
    assert "k3·loss s2 kl_coef=0.05 lr=3e-05" in names  # the base kl_coef, as the arms' values differ
    assert "k1·reward s2 kl_coef=0.5 lr=1e-05" in names


def test_sampled_values_are_shortened(tmp_path):
    study = study_from(tmp_path, {"arms": ARMS[1:2]},
                       optuna={"metric": "reward/mean", "mode": "max", "num_samples": 2,
                               "params": {"algorithm.kl_coef": {"loguniform": [1.0e-3, 1.0e-1]}}})
    labels, sampled = {"arms": "reverse_k1_in_reward"}, {"algorithm.kl_coef": 0.00703573702872215}
    assert short_trial_name(study, labels, sampled) == "k1·reward s0 kl_coef=0.007036"
    assert long_trial_name(study, labels, sampled) == "reverse_k1_in_reward kl_coef=0.007036"


def test_generic_leaves_read_as_their_section():
    assert field_label("task.name") == "task" and field_label("model.path") == "model"
    assert field_label("algorithm.kl_coef") == "kl_coef"
