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
    with pytest.raises(SpecError, match=r"^--set run.steps.x=1: run.steps.x: 'steps' is not a section"):
        apply_overrides({"run": {"steps": 5}}, ["run.steps.x=1"])


def test_load_config_applies_overrides_and_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: {kl_mode: in_reward, kl_estimator: k1}\nrun: {steps: 4}\n")
    config = load_config(path, ["run.seed=7"])
    assert isinstance(config, Config)
    assert (config.algorithm.kl_mode, config.run.steps, config.run.seed) == ("in_reward", 4, 7)


@pytest.mark.parametrize("body, override, source, message", [
    ("algorithm: {kl_mode: sideways}\n", [], "FILE", r"algorithm.kl_mode: unknown value 'sideways'"),
    ("algorithm: {kl_mod: none}\n", [], "FILE", r"algorithm.kl_mod: unknown key"),
    ("run: {steps: 4}\n", ["run.steps=many"], "--set run.steps=many", r"run.steps: expected int, got str 'many'"),
    ("run: {steps: 4}\n", ["run.seed=1", "learner.lr=-1"], "--set learner.lr=-1", r"learner.lr: must be > 0"),
    # cross-field: the override names another field than the one the check names
    ("rollout: {max_model_len: 64}\n", ["rollout.max_new_tokens=64"], "--set rollout.max_new_tokens=64",
     r"rollout.max_model_len: must exceed rollout.max_new_tokens \(64\)"),
])
def test_bad_values_name_the_file_or_the_set_and_the_key(tmp_path, body, override, source, message):
    """The file's own errors name the file; errors an override causes name `--set KEY=VALUE`, not the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(SpecError) as info:
        load_config(path, override)
    text = str(info.value)
    assert text.startswith(f"{path if source == 'FILE' else source}: "), text
    assert info.match(message) and "\n" not in text


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


# (id, file text, dotted path the message names, further substrings it must contain)
BAD_YAML = [
    ("duplicate-top-level-key", "name: a\nbase: {}\nname: b\n", "name", ["line 3 (first at line 1)"]),
    # the case: PyYAML kept only the second seed list and the study ran it silently
    ("duplicate-axis", "grid:\n  run.seed: [0, 1]\n  run.seed: [2, 3]\n", "grid.run.seed",
     ["line 3 (first at line 2)"]),
    ("duplicate-field-in-flow-arm",
     "grid:\n  arms:\n    - {name: a, algorithm.kl_mode: none, algorithm.kl_mode: in_loss}\n",
     "grid.arms[0].algorithm.kl_mode", ["line 3, column 42 (first at line 3, column 17)"]),
    ("duplicate-field-in-block-arm",
     "grid:\n  arms:\n    - name: a\n    - name: b\n      run.steps: 2\n      run.steps: 3\n",
     "grid.arms[1].run.steps", ["line 6 (first at line 5)"]),
    ("inf-in-base", "base:\n  algorithm:\n    kl_coef: .inf\n", "base.algorithm.kl_coef", ["'.inf'", "line 3"]),
    ("minus-inf", "base: {learner: {weight_decay: -.Inf}}\n", "base.learner.weight_decay", ["'-.Inf'"]),
    ("nan-in-grid-list", "grid:\n  algorithm.kl_coef: [0.1, .nan]\n", "grid.algorithm.kl_coef[1]", ["'.nan'"]),
    ("inf-optuna-range-end", "optuna:\n  params:\n    learner.lr: {uniform: [1.0e-5, .inf]}\n",
     "optuna.params.learner.lr.uniform[1]", ["line 3"]),
    ("overflowing-float", "base: {algorithm: {kl_coef: 1.0e400}}\n", "base.algorithm.kl_coef", ["'1.0e400'"]),
    ("inf-outside-the-config", "tune: {max_failures: .inf}\n", "tune.max_failures", ["finite"]),
]


@pytest.mark.parametrize("body, path, parts", [b[1:] for b in BAD_YAML], ids=[b[0] for b in BAD_YAML])
def test_yaml_refuses_duplicate_keys_and_non_finite_numbers_anywhere(tmp_path, body, path, parts):
    file = tmp_path / "study.yaml"
    file.write_text(body)
    with pytest.raises(SpecError) as info:
        load_yaml(file)
    message = str(info.value)
    assert message.startswith(f"{file}: {path}: "), message
    assert all(part in message for part in parts) and "\n" not in message, message


def test_yaml_merge_keys_and_repeated_keys_in_different_mappings_are_fine(tmp_path):
    file = tmp_path / "ok.yaml"
    file.write_text("defaults: &d {steps: 2, seed: 1}\nrun:\n  <<: *d\n  steps: 5\nother: {steps: 3}\n")
    assert load_yaml(file) == {"defaults": {"steps": 2, "seed": 1}, "run": {"steps": 5, "seed": 1},
                               "other": {"steps": 3}}


@pytest.mark.parametrize("text, message", [
    ("algorithm.kl_coef=.inf", "--set algorithm.kl_coef=.inf: algorithm.kl_coef: '.inf' is not a finite number"),
    ("learner.lr=-.nan", "--set learner.lr=-.nan: learner.lr: '-.nan' is not a finite number"),
    ("model.tiny={hidden_size: 64, hidden_size: 32}",
     "--set model.tiny={hidden_size: 64, hidden_size: 32}: model.tiny.hidden_size: duplicate key;"),
])
def test_set_values_are_checked_like_file_values_and_name_the_set(text, message):
    with pytest.raises(SpecError) as info:
        parse_override(text)
    assert str(info.value).startswith(message), str(info.value)
