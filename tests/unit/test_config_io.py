"""YAML loading and `--set` overrides: values parse as YAML scalars; errors name the file and the key."""
from __future__ import annotations

import pytest

from core.config import Config
from orchestrator.config_io import SpecError, apply_overrides, load_config, load_yaml, parse_override


@pytest.mark.parametrize("text, key, value", [
    ("algorithm.kl_coef=1e-2", "algorithm.kl_coef", 0.01),
    ("run.seed=3", "run.seed", 3),
    ("algorithm.kl_importance_correction=true", "algorithm.kl_importance_correction", True),
    ("task.data_path=data/x.jsonl", "task.data_path", "data/x.jsonl"),
    ("task.instruction=a=b", "task.instruction", "a=b"),
    ("task.instruction=", "task.instruction", ""),
    ("algorithm.kl_mode='none'", "algorithm.kl_mode", "none"),
])
def test_override_values_parse_as_yaml_scalars(text, key, value):
    assert parse_override(text) == (key, value)
    assert type(parse_override(text)[1]) is type(value)


def test_override_without_equals_is_rejected():
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        parse_override("algorithm.kl_coef")


def test_overrides_apply_deeply_without_touching_the_input():
    base = {"algorithm": {"kl_mode": "none"}, "run": {"steps": 5}}
    out = apply_overrides(base, ["algorithm.kl_mode=in_loss", "algorithm.kl_estimator=k3", "learner.lr=1e-5"])
    assert out == {"algorithm": {"kl_mode": "in_loss", "kl_estimator": "k3"}, "run": {"steps": 5},
                   "learner": {"lr": 1e-5}}
    assert base["algorithm"]["kl_mode"] == "none"


def test_override_through_a_scalar_names_the_key():
    with pytest.raises(SpecError, match=r"--set: run.steps.x: 'steps' is not a section"):
        apply_overrides({"run": {"steps": 5}}, ["run.steps.x=1"])


def test_load_config_applies_overrides_and_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: {kl_mode: in_reward, kl_estimator: k1}\nrun: {steps: 4}\n")
    config = load_config(path, ["run.seed=7"])
    assert isinstance(config, Config)
    assert (config.algorithm.kl_mode, config.run.steps, config.run.seed) == ("in_reward", 4, 7)


@pytest.mark.parametrize("body, override, message", [
    ("algorithm: {kl_mode: sideways}\n", [], r"algorithm.kl_mode: unknown value 'sideways'"),
    ("algorithm: {kl_mod: none}\n", [], r"algorithm.kl_mod: unknown key"),
    ("run: {steps: 4}\n", ["run.steps=many"], r"run.steps: expected int, got str 'many'"),
    ("run: {steps: 4}\n", ["learner.lr=-1"], r"learner.lr: must be > 0"),
])
def test_bad_values_name_the_file_and_key(tmp_path, body, override, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(SpecError) as info:
        load_config(path, override)
    assert str(path) in str(info.value)
    assert info.match(message)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  steps: [1, 2\n")
    with pytest.raises(SpecError, match=rf"{path}: invalid YAML \(line \d+"):
        load_yaml(path)


def test_top_level_must_be_a_mapping_and_missing_files_are_named(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping at the top level"):
        load_yaml(path)
    with pytest.raises(SpecError, match="nope.yaml: cannot read"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
