"""Study files: grid expansion (field and bundle axes), Optuna spaces, and validation before anything runs."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.config_io import SpecError
from orchestrator.search_space import load_study
from workers.device import actor_device

SPACES = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))
ARMS = [{"algorithm.kl_mode": "none"},
        {"algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k1"},
        {"algorithm.kl_mode": "in_loss", "algorithm.kl_estimator": "k3", "algorithm.kl_clamp": 10}]


def write(tmp_path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def study_dict(**extra) -> dict:
    return copy.deepcopy({"name": "t", "base": {"run": {"steps": 2}}, "grid": {"arms": ARMS, "run.seed": [0, 1]},
                          **extra})


def test_shipped_spaces_exist():
    names = {p.stem for p in SPACES}
    assert {"miniature", "smoke", "optuna_kl_coef", "seed_palindrome_r1_1p5b", "seed_deepscaler_r1_1p5b"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_validates(path):
    from orchestrator.preflight import check_study

    study = load_study(path)
    assert study.name == path.stem
    assert study.num_trials() >= 1
    for labels in study.grid():
        study.trial_config(labels)
    assert study.warnings == () and check_study(study) == ()  # against this machine and the local models


def test_seed_studies_clamp_k3_and_only_k3():
    """k3 in the loss overflows unclamped (core/config.py); the seed studies clamp it at 10 as verl does, and
    leave k1 in the reward unclamped (verl never clamps k1). The miniature study clamps both KL arms (its
    base), so its arms differ only in where the KL goes and the report pairs k1 with k3."""
    for labels in (study := load_study(next(p for p in SPACES if p.stem == "miniature"))).grid():
        a = study.trial_config(labels).algorithm
        assert (a.kl_clamp, a.allow_unclamped_k3) == (10.0, False), labels
    for stem in ("seed_palindrome_r1_1p5b", "seed_deepscaler_r1_1p5b", "smoke"):
        study = load_study(next(p for p in SPACES if p.stem == stem))
        for labels in study.grid():
            a = study.trial_config(labels).algorithm
            assert (a.kl_clamp, a.allow_unclamped_k3) == ((10.0, False) if a.kl_estimator == "k3" and
                                                          a.kl_mode != "none" else (0.0, False)), (stem, labels)


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


def test_set_overrides_the_base(tmp_path):
    study = load_study(write(tmp_path, study_dict()), ["run.steps=9", "learner.lr=1e-3"])
    cfg = study.trial_config(study.grid()[1])
    assert (cfg.run.steps, cfg.learner.lr, cfg.run.seed) == (9, 1e-3, 1)
    assert study.overrides == ("run.steps=9", "learner.lr=1e-3") and study.file_base["run"] == {"steps": 2}
    assert study.from_file_only().trial_config(study.grid()[1]).run.steps == 2


def test_no_grid_is_one_trial(tmp_path):
    study = load_study(write(tmp_path, {"name": "single", "base": {"run": {"steps": 1}}}))
    assert study.grid() == [{}] and study.num_trials() == 1


def test_param_space_for_tune_grid(tmp_path):
    study = load_study(write(tmp_path, study_dict()))
    space = study.param_space()
    assert space["grid"]["arms"] == {"grid_search": ["none", "in_reward-k1", "in_loss-k3-10"]}
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
    with pytest.raises(SpecError, match=r"^--set learner.lr=0: learner.lr: must be > 0"):
        load_study(write(tmp_path, study_dict()), ["run.steps=3", "learner.lr=0"])


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


OPTUNA_LR = {"metric": "reward/mean", "mode": "max", "num_samples": 2,
             "params": {"learner.lr": {"loguniform": [1e-5, 1e-3]}}}


@pytest.mark.parametrize("mutate, where, message", [
    # the issue's case: the arm's seed 7 was silently replaced by the axis's seeds
    (lambda d: d["grid"]["arms"][0].update({"run.seed": 7}), "grid.arms[0].run.seed",
     "run.seed is also set by grid.run.seed"),
    (lambda d: d["grid"].update({"lrs": [{"learner.lr": 1e-4}, {"learner.lr": 1e-3, "algorithm.kl_mode": "none"}]}),
     "grid.lrs[1].algorithm.kl_mode", "algorithm.kl_mode is also set by grid.arms[0].algorithm.kl_mode"),
    (lambda d: d.update(optuna={**OPTUNA_LR, "params": {"run.seed": {"randint": [0, 9]}}}), "optuna.params.run.seed",
     "also set by grid.run.seed; Optuna's sample would silently replace"),
    (lambda d: d["grid"].update({"arms": [dict(ARMS[0], name="a"), dict(ARMS[0], name="b")]}), "grid.arms[1]",
     "sets exactly what grid.arms[0] (a) sets"),
    (lambda d: d["base"].update(tracking={"tracking_uri": "ftp://host/mlflow"}), "base",
     "tracking.tracking_uri: 'ftp://host/mlflow' is unsupported scheme 'ftp://'; klrl tracks to sqlite:///"),
    (lambda d: d["base"].update(tracking={"tracking_uri": "runs/mlruns"}), "base",
     "tracking.tracking_uri: 'runs/mlruns' is a plain path (MLflow's file store)"),
])
def test_silent_overrides_and_unusable_settings_are_refused(tmp_path, mutate, where, message):
    data = study_dict()
    mutate(data)
    path = write(tmp_path, data, "bad_study.yaml")
    with pytest.raises(SpecError) as info:
        load_study(path)
    assert str(info.value).startswith(f"{path}: {where}: "), str(info.value)
    assert message in str(info.value)


def test_non_finite_optuna_range_from_a_dict_is_refused():
    """A study dict that did not come through the YAML loader (e.g. built in Python) is checked too."""
    from orchestrator.search_space import parse_study

    data = study_dict(optuna={**OPTUNA_LR, "params": {"algorithm.kl_coef": {"uniform": [0.0, float("inf")]}}})
    with pytest.raises(SpecError, match=r"^s.yaml: optuna.params.algorithm.kl_coef.uniform: expected finite values"):
        parse_study(data, "s.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["run.seed=5"], "--set run.seed=5: run.seed: set by grid.run.seed in every trial, which would silently override"),
    (["learner.lr=1e-4"], "--set learner.lr=1e-4: learner.lr: set by optuna.params.learner.lr"),
    (["algorithm.kl_coeff=0.1"], "--set algorithm.kl_coeff=0.1: algorithm.kl_coeff: unknown key"),
    (["run.steps=3", "rollout.max_new_tokens=600"],
     "--set run.steps=3 --set rollout.max_new_tokens=600: rollout.max_model_len: must exceed rollout.max_new_tokens"),
    (["task.train_size=12"], "--set task.train_size=12: grid.run.seed=seed=0, grid.task.prompts_per_step="
                             "prompts_per_step=16: task.train_size: must be >= task.prompts_per_step (16)"),
    (["tracking.tracking_uri=s3://bucket/x"], "--set tracking.tracking_uri=s3://bucket/x: tracking.tracking_uri: "
                                              "'s3://bucket/x' is unsupported scheme 's3://'"),
])
def test_set_errors_name_the_set_not_the_study_file(tmp_path, overrides, message):
    data = study_dict(grid={"run.seed": [0, 1], "task.prompts_per_step": [16]}, optuna=OPTUNA_LR)
    with pytest.raises(SpecError) as info:
        load_study(write(tmp_path, data), overrides)
    assert str(info.value).startswith(message), str(info.value)
    assert "study.yaml" not in str(info.value)


def test_in_reward_estimators_other_than_k1_are_warnings_naming_the_arm(tmp_path):
    in_reward = {"algorithm.kl_mode": "in_reward"}
    arms = [dict(ARMS[1], name="k1r"), {**in_reward, "name": "k2r", "algorithm.kl_estimator": "k2"},
            {**in_reward, "name": "exr", "algorithm.kl_estimator": "exact_reverse"}]
    path = write(tmp_path, study_dict(grid={"arms": arms, "run.seed": [0, 1]}))
    study = load_study(path)
    assert study.num_trials() == 6  # still runs: a warning, not an error
    assert [w.split(": ")[1] for w in study.warnings] == ["grid.arms[1] (k2r)", "grid.arms[2] (exr)"]
    assert all(w.startswith(f"{path}: ") and "biased gradient" in w for w in study.warnings)
