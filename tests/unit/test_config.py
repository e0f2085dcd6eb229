"""Config.from_dict rejects bad input with a message naming the field; good configs round-trip."""
from __future__ import annotations

import dataclasses
import math

import pytest

from core.config import Config, ConfigError, advisories, field_names, flatten

BAD = [
    # (id, input, the field the message must name, another substring the message must contain)
    ("unknown-section", {"algo": {}}, "algo", "allowed keys"),
    ("unknown-key", {"algorithm": {"kl_moed": "none"}}, "algorithm.kl_moed", "kl_mode"),
    ("section-not-mapping", {"algorithm": 3}, "algorithm", "mapping"),
    ("wrong-type-str-for-float", {"learner": {"lr": "1e-4"}}, "learner.lr", "float"),
    ("bool-for-int", {"rollout": {"n_samples": True}}, "rollout.n_samples", "int"),
    ("float-for-int", {"run": {"steps": 2.0}}, "run.steps", "int"),
    ("str-for-bool", {"algorithm": {"kl_importance_correction": "yes"}}, "algorithm.kl_importance_correction",
     "bool"),
    ("unknown-kl-mode", {"algorithm": {"kl_mode": "reward"}}, "algorithm.kl_mode", "in_reward"),
    ("unknown-estimator", {"algorithm": {"kl_estimator": "k4"}}, "algorithm.kl_estimator", "k3_plus"),
    ("k3-plus-in-reward", {"algorithm": {"kl_mode": "in_reward", "kl_estimator": "k3_plus"}},
     "algorithm.kl_estimator", "k3_plus"),
    ("unknown-advantage", {"algorithm": {"advantage": "ppo"}}, "algorithm.advantage", "rloo"),
    ("unknown-loss-agg", {"algorithm": {"loss_agg": "mean"}}, "algorithm.loss_agg", "token-mean"),
    ("negative-kl-coef", {"algorithm": {"kl_coef": -0.1}}, "algorithm.kl_coef", ">= 0"),
    ("negative-kl-clamp", {"algorithm": {"kl_clamp": -1}}, "algorithm.kl_clamp", ">= 0"),
    ("clip-eps-one", {"algorithm": {"clip_eps": 1.0}}, "algorithm.clip_eps", "(0, 1)"),
    ("clip-eps-zero", {"algorithm": {"clip_eps": 0.0}}, "algorithm.clip_eps", "(0, 1)"),
    ("dual-clip-below-one", {"algorithm": {"dual_clip": 0.5}}, "algorithm.dual_clip", "> 1"),
    ("rloo-one-sample", {"rollout": {"n_samples": 1}}, "rollout.n_samples", ">= 2"),
    ("grpo-one-sample", {"algorithm": {"advantage": "grpo"}, "rollout": {"n_samples": 1}}, "rollout.n_samples",
     "grpo"),
    ("zero-stage-4", {"learner": {"zero_stage": 4}}, "learner.zero_stage", "[0, 1, 2, 3]"),
    ("batch-not-divisible", {"task": {"prompts_per_step": 3}, "rollout": {"n_samples": 3},
                             "learner": {"num_workers": 2}}, "learner.num_workers", "9"),
    ("max-below-min-letters", {"task": {"min_letters": 5, "max_letters": 4}}, "task.max_letters",
     "min_letters"),
    ("deepscaler-without-data", {"task": {"name": "deepscaler"}}, "task.data_path", "deepscaler"),
    ("unknown-task", {"task": {"name": "gsm8k"}}, "task.name", "palindrome"),
    ("top-p-zero", {"rollout": {"top_p": 0.0}}, "rollout.top_p", "must be 1.0"),
    ("unknown-weight-sync", {"rollout": {"weight_sync": "nccl"}}, "rollout.weight_sync", "collective"),
    ("unknown-dtype", {"model": {"dtype": "fp16"}}, "model.dtype", "bfloat16"),
    ("heads-do-not-divide", {"model": {"tiny": {"num_heads": 3}}}, "model.tiny.num_heads", "hidden_size"),
    ("kl-coef-inf", {"algorithm": {"kl_coef": math.inf}}, "algorithm.kl_coef", "finite number, got inf"),
    # NaN fails every comparison, so fields without a range check took it
    ("tiny-sft-lr-nan", {"model": {"tiny": {"sft_lr": math.nan}}}, "model.tiny.sft_lr", "finite number, got nan"),
    ("tensor-parallel-2", {"rollout": {"tensor_parallel_size": 2}}, "rollout.tensor_parallel_size",
     "raise rollout.num_workers"),
    ("top-p-below-one", {"rollout": {"top_p": 0.95}}, "rollout.top_p", "nucleus mask"),
    ("k3-in-loss-unclamped", {"algorithm": {"kl_mode": "in_loss", "kl_estimator": "k3"}}, "algorithm.kl_clamp",
     "allow_unclamped_k3: true"),
    ("k3-plus-in-loss-unclamped", {"algorithm": {"kl_mode": "in_loss", "kl_estimator": "k3_plus"}},
     "algorithm.kl_clamp", "overflows float32"),
    ("k3-in-reward-unclamped", {"algorithm": {"kl_mode": "in_reward", "kl_estimator": "k3"}}, "algorithm.kl_clamp",
     "kl_mode=in_reward"),
    ("sequences-per-step-absurd", {"rollout": {"n_samples": 10**6}}, "rollout.n_samples", "1,048,576"),
    ("prompts-per-step-absurd", {"task": {"prompts_per_step": 2**20, "train_size": 2**20}}, "task.prompts_per_step",
     "8,388,608 sequences"),
    ("eval-sequences-absurd", {"run": {"eval_n_samples": 10**6}}, "run.eval_n_samples", "32,000,000 sequences"),
]


@pytest.mark.parametrize("data,field,hint", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_field(data, field, hint):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert hint in message, message
    assert isinstance(info.value, ValueError)


def test_bad_inputs_are_distinct_and_many():
    assert len({b[0] for b in BAD}) == len(BAD) >= 12


GOOD = {
    "algorithm": {"kl_mode": "in_loss", "kl_estimator": "k3", "kl_coef": 0.1, "kl_clamp": 10,
                  "kl_importance_correction": True, "advantage": "grpo", "clip_eps_high": 0.28,
                  "dual_clip": 3.0, "loss_agg": "seq-mean-token-mean"},
    "rollout": {"n_samples": 4, "temperature": 0.7, "weight_sync": "collective"},
    "learner": {"num_workers": 2, "mini_batches": 2, "zero_stage": 2, "lr": 1},
    "task": {"prompts_per_step": 4, "min_letters": 4, "max_letters": 6},
    "model": {"tiny": {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 1}},
    "run": {"steps": 3, "seed": 7},
}


def test_good_config_round_trips_through_dicts():
    config = Config.from_dict(GOOD)
    assert config.algorithm.kl_estimator == "k3" and config.learner.zero_stage == 2
    assert config.learner.lr == 1.0 and isinstance(config.learner.lr, float)  # ints accepted for floats
    assert config.algorithm.kl_clamp == 10.0 and isinstance(config.algorithm.kl_clamp, float)
    again = Config.from_dict(config.to_dict())
    assert again == config and again.to_dict() == config.to_dict()
    assert Config.from_dict({}) == Config() == Config.from_dict(None)
    assert Config.from_dict(Config().to_dict()) == Config()
    assert set(flatten(config.to_dict())) == set(field_names())


def test_replace_validates_and_leaves_the_original_alone():
    base = Config.from_dict(GOOD)
    changed = base.replace(**{"algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k1",
                              "run.seed": 11})
    assert (changed.algorithm.kl_mode, changed.algorithm.kl_estimator, changed.run.seed) == ("in_reward", "k1", 11)
    assert base.algorithm.kl_mode == "in_loss" and base.run.seed == 7
    assert changed.rollout == base.rollout
    with pytest.raises(ConfigError, match="^algorithm.kl_estimator:"):
        base.replace(**{"algorithm.kl_mode": "in_reward", "algorithm.kl_estimator": "k3_plus"})
    with pytest.raises(ConfigError, match="^algorithm.nope:"):
        base.replace(**{"algorithm.nope": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.algorithm.kl_coef = 1.0  # type: ignore[misc]


def test_unclamped_k3_needs_an_explicit_opt_in_and_a_clamp_is_enough():
    k3 = {"kl_mode": "in_loss", "kl_estimator": "k3"}
    assert Config.from_dict({"algorithm": {**k3, "allow_unclamped_k3": True}}).algorithm.kl_clamp == 0
    assert Config.from_dict({"algorithm": {**k3, "kl_clamp": 10}}).algorithm.kl_clamp == 10
    assert Config.from_dict({"algorithm": {"kl_mode": "none", "kl_estimator": "k3"}})  # k3 unused: no clamp needed
    assert Config.from_dict({"algorithm": {"kl_mode": "in_loss", "kl_estimator": "k2"}})  # k2 cannot overflow


@pytest.mark.parametrize("mode, estimator, biased", [
    ("in_reward", "k1", False), ("in_reward", "k2", True), ("in_reward", "k3", True),
    ("in_reward", "exact_reverse", True), ("in_reward", "exact_forward", True),
    ("in_loss", "k2", False), ("in_loss", "k3", False), ("none", "k3", False)])
def test_in_reward_estimators_other_than_k1_are_legal_but_warned_about(mode, estimator, biased):
    config = Config.from_dict({"algorithm": {"kl_mode": mode, "kl_estimator": estimator, "kl_clamp": 10}})
    notes = advisories(config)
    assert len(notes) == int(biased)
    if biased:
        assert notes[0].startswith("algorithm.kl_estimator: ") and "biased gradient" in notes[0] and "k1" in notes[0]
