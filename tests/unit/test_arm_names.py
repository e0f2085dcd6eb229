"""Arm labels in the report: sampled (Optuna) floats are shortened, grid values kept as written."""
from types import SimpleNamespace

from orchestrator.study_runs import Trial, _suffix_axes, arm_name


def test_sampled_floats_are_shortened_and_grid_values_kept():
    extra = {"algorithm.kl_coef": "0.00703573702872215", "learner.lr": "0.001", "task.name": "palindrome",
             "rollout.n_samples": "16"}
    assert arm_name("in_reward", "k1", extra) == \
        "in_reward/k1 kl_coef=0.007036 lr=0.001 n_samples=16 name=palindrome"
    assert arm_name("none", "", None) == "none"


def test_a_setting_that_comes_with_its_arm_does_not_split_the_arms():
    """The k3 arm alone sets kl_clamp (as the seed studies do): the arms stay 'none', 'in_reward/k1' and
    'in_loss/k3', so the report can still pair k1 with k3; a kl_coef that differs within an arm splits it."""
    def run(tags):
        return SimpleNamespace(data=SimpleNamespace(tags={f"axis.{k}": v for k, v in tags.items()}, params={}))

    arms = [("none", {}), ("in_reward/k1", {}), ("in_loss/k3", {"algorithm.kl_clamp": "10"})]
    runs = {f"{i}{seed}": run({"algorithm.kl_mode": arm.split("/")[0], "run.seed": str(seed), **extra})
            for i, (arm, extra) in enumerate(arms) for seed in (0, 1)}
    trials = [Trial(run_id, "r", "p", arms[int(run_id[0])][0], run_id[1], "FINISHED", 10) for run_id in runs]
    _suffix_axes(trials, runs)
    assert sorted({t.arm for t in trials}) == ["in_loss/k3", "in_reward/k1", "none"]

    runs["20"] = run({"algorithm.kl_mode": "in_loss", "run.seed": "0", "algorithm.kl_clamp": "5"})
    trials = [Trial(run_id, "r", "p", arms[int(run_id[0])][0], run_id[1], "FINISHED", 10) for run_id in runs]
    _suffix_axes(trials, runs)
    assert sorted({t.arm for t in trials}) == ["in_loss/k3 kl_clamp=10", "in_loss/k3 kl_clamp=5", "in_reward/k1",
                                               "none"]
