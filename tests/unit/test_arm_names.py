"""Arm labels in the report: sampled (Optuna) floats are shortened, grid values kept as written."""
from orchestrator.study_runs import arm_name


def test_sampled_floats_are_shortened_and_grid_values_kept():
    extra = {"algorithm.kl_coef": "0.00703573702872215", "learner.lr": "0.001", "task.name": "palindrome",
             "rollout.n_samples": "16"}
    assert arm_name("in_reward", "k1", extra) == \
        "in_reward/k1 kl_coef=0.007036 lr=0.001 n_samples=16 name=palindrome"
    assert arm_name("none", "", None) == "none"
