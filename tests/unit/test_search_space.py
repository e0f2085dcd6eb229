"""Study files: grid expansion (field and bundle axes), Optuna spaces, and validation before anything runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.config_io import SpecError
from orchestrator.search_space import load_study
from workers.device import actor_device

SPACES = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))
ARMS = [{"algorithm.kl_mode": "none"},
        {"algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k1"},
        {"algorithm.kl_mode": "in_loss", "algorithm.kl_estimator": "k3"}]


def write(tmp_path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def study_dict(**extra) -> dict:
    return {"name": "t", "base": {"run": {"steps": 2}}, "grid": {"arms": ARMS, "run.seed": [0, 1]}, **extra}


def test_shipped_spaces_exist():
    names = {p.stem for p in SPACES}
    assert {"miniature", "smoke", "optuna_kl_coef", "seed_palindrome_r1_1p5b", "seed_deepscaler_r1_1p5b"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_validates(path):
    study = load_study(path)
    assert study.name == path.stem
    assert study.num_trials() >= 1
    for labels in study.grid():
        study.trial_config(labels)


def test_seed_studies_hold_the_three_arms_on_gpus():
    for stem in ("seed_palindrome_r1_1p5b", "seed_deepscaler_r1_1p5b", "miniature"):
        study = load_study(next(p for p in SPACES if p.stem == stem))
        arms = {(c.algorithm.kl_mode, c.algorithm.kl_estimator if c.algorithm.kl_mode != "none" else "-")
                for c in (study.trial_config(labels) for labels in study.grid())}
        assert arms == {("none", "-"), ("in_reward", "k1"), ("in_loss", "k3")}
        if stem.startswith("seed_"):
            cfg = study.trial_config(study.grid()[0])
            assert cfg.learner.gpus_per_worker >= 1 and cfg.rollout.gpus_per_worker >= 1
            learner = actor_device(cfg.learner.cpus_per_worker, cfg.learner.gpus_per_worker)
            assert (learner.dist_backend(cfg.learner.backend), cfg.model.dtype) == ("nccl", "bfloat16")
            assert "DeepSeek-R1-Distill-Qwen-1.5B" in cfg.model.path


def test_grid_is_the_product_of_bundle_and_field_axes(tmp_path):
    study = load_study(write(tmp_path, study_dict()))
    grid = study.grid()
    assert len(grid) == 6 and study.num_trials() == 6
    configs = [study.trial_config(labels) for labels in grid]
    assert [(c.algorithm.kl_mode, c.run.seed) for c in configs] == [
        ("none", 0), ("none", 1), ("in_reward", 0), ("in_reward", 1), ("in_loss", 0), ("in_loss", 1)]
    assert configs[4].algorithm.kl_estimator == "k3" and configs[0].run.steps == 2
    assert grid[2] == {"arms": "in_reward-k1", "run.seed": "seed=0"}
    assert study.trial_overrides(grid[2]) == {"algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k1",
                                              "run.seed": 0}


def test_bundle_names_label_trials(tmp_path):
    data = study_dict(grid={"arms": [dict(ARMS[0], name="nokl"), dict(ARMS[2], name="k3loss")]})
    study = load_study(write(tmp_path, data))
    assert [g["arms"] for g in study.grid()] == ["nokl", "k3loss"]
    assert study.trial_name(study.grid()[1]) == "k3loss"


def test_set_overrides_the_base_and_the_grid_wins(tmp_path):
    study = load_study(write(tmp_path, study_dict()), ["run.steps=9", "run.seed=5"])
    cfg = study.trial_config(study.grid()[1])
    assert cfg.run.steps == 9 and cfg.run.seed == 1


def test_no_grid_is_one_trial(tmp_path):
    study = load_study(write(tmp_path, {"name": "single", "base": {"run": {"steps": 1}}}))
    assert study.grid() == [{}] and study.num_trials() == 1


def test_param_space_for_tune_grid(tmp_path):
    study = load_study(write(tmp_path, study_dict()))
    space = study.param_space()
    assert space["grid"]["arms"] == {"grid_search": ["none", "in_reward-k1", "in_loss-k3"]}
    assert space["grid"]["run.seed"] == {"grid_search": ["seed=0", "seed=1"]}


def test_optuna_space(tmp_path):
    data = study_dict(grid={"run.seed": [0]}, optuna={
        "metric": "reward/mean", "mode": "max", "num_samples": 4,
        "params": {"algorithm.kl_coef": {"loguniform": [1e-3, 1e-1]}, "learner.lr": {"uniform": [1e-5, 1e-4]}}})
    study = load_study(write(tmp_path, data))
    assert study.num_trials() == 4
    space = study.param_space()
    assert set(space["search"]) == {"algorithm.kl_coef", "learner.lr"}
    config = study.trial_config({"run.seed": "seed=0"}, {"algorithm.kl_coef": 0.02})
    assert config.algorithm.kl_coef == 0.02
    tune_config = study.tune_config()
    assert tune_config.num_samples == 4 and tune_config.metric == "reward/mean"
    assert type(tune_config.search_alg).__name__ == "OptunaSearch"


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d["grid"].update({"algorithm.kl_mood": ["none"]}), "grid.algorithm.kl_mood: unknown config field"),
    (lambda d: d.update(grid={}), "grid: expected a non-empty mapping"),
    (lambda d: d["grid"].update({"run.seed": []}), "grid.run.seed: expected a non-empty list"),
    (lambda d: d["grid"].update({"arms": [{"algorithm.kl_mode": "sideways"}]}),
     "grid.arms[0] (sideways): algorithm.kl_mode: unknown value 'sideways'"),
    (lambda d: d["grid"].update({"arms": [{"algorithm.kl_mdoe": "none"}]}), "grid.arms[0].algorithm.kl_mdoe"),
    (lambda d: d["grid"].update({"arms": ["none"]}), "grid.arms[0]: a bundle axis"),
    (lambda d: d["grid"].update({"run.seed": [[1]]}), "grid.run.seed[0]: expected a scalar"),
    (lambda d: d["grid"].update({"run.seed": [1, 1]}), "grid.run.seed: duplicate values"),
    (lambda d: d["grid"].update({"run.steps": [0]}), "grid.run.steps[0] (steps=0): run.steps: must be >= 1"),
    (lambda d: d["grid"].update({"task.prompts_per_step": [1000]}),
     "grid.arms=none, grid.run.seed=seed=0, grid.task.prompts_per_step=prompts_per_step=1000: task.train_size"),
    (lambda d: d["grid"].update({"arms": [{"algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k3_plus"}]}),
     "algorithm.kl_estimator: k3_plus only changes"),
    (lambda d: d["base"].update(algorithm={"kl_coef": -1.0}), "base: algorithm.kl_coef: must be >= 0"),
    (lambda d: d.pop("name"), "name: required"),
    (lambda d: d.update(griid={}), "griid: unknown key"),
    (lambda d: d.update(tune={"max_failures": -1}), "tune.max_failures"),
    (lambda d: d.update(optuna={"metric": "reward/mean", "mode": "up", "num_samples": 2,
                                "params": {"learner.lr": {"loguniform": [1e-5, 1e-3]}}}), "optuna.mode"),
    (lambda d: d.update(optuna={"metric": "reward/mean", "mode": "max", "num_samples": 2,
                                "params": {"learner.lr": {"loguniform": [0, 1e-3]}}}),
     "optuna.params.learner.lr.loguniform: loguniform needs low > 0"),
    (lambda d: d.update(optuna={"metric": "reward/mean", "mode": "max", "num_samples": 2,
                                "params": {"algorithm.kl_coef": {"uniform": [-1.0, 1.0]}}}),
     "optuna.params.algorithm.kl_coef=-1.0: algorithm.kl_coef: must be >= 0"),
    (lambda d: d.update(optuna={"metric": "reward/mean", "mode": "max", "num_samples": 2,
                                "params": {"learner.lrr": {"uniform": [1e-5, 1e-3]}}}),
     "optuna.params.learner.lrr: unknown config field"),
])
def test_bad_studies_are_rejected_with_file_and_key(tmp_path, mutate, key):
    data = study_dict()
    mutate(data)
    path = write(tmp_path, data, "bad_study.yaml")
    with pytest.raises(SpecError) as info:
        load_study(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert key in message, message


def test_bad_set_override_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"study.yaml: base: learner.lr: must be > 0"):
        load_study(write(tmp_path, study_dict()), ["learner.lr=0"])


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    """cluster.yaml passes the Ray cluster launcher's own schema (after its defaults are filled in)."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((SPACES[0].parents[1] / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))
    types = config["available_node_types"]
    assert config["provider"]["type"] in ("aws", "gcp")
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())
    assert any("[gpu]" in cmd for cmd in config["setup_commands"])


def test_optuna_searcher_accepts_the_space_and_suggests_valid_trials():
    """OptunaSearch (no Ray cluster needed) takes the study's param space; each suggestion is a valid trial."""
    study = load_study(next(p for p in SPACES if p.stem == "optuna_kl_coef"))
    tune_config = study.tune_config()
    searcher = tune_config.search_alg
    assert searcher.set_search_properties(tune_config.metric, tune_config.mode, study.param_space())
    lo, hi = study.optuna["params"]["algorithm.kl_coef"]["loguniform"]
    for i in range(3):
        suggestion = searcher.suggest(f"t{i}")
        config = study.trial_config(suggestion["grid"], suggestion["search"])
        assert lo <= config.algorithm.kl_coef <= hi and config.algorithm.kl_mode == "in_reward"
        searcher.on_trial_complete(f"t{i}", {tune_config.metric: 0.1 * i, "training_iteration": 1})
