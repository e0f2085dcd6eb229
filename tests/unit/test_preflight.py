"""Preflight: a study checked against its model's length limit and shape and against the machine's memory,
before any trial starts; every error is one line naming the file (or `--set`) and the field."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from core.config import Config
from orchestrator.config_io import SpecError
from orchestrator.preflight import GIB, Machine, check_study, longest_prompt_tokens
from orchestrator.search_space import load_study

MACHINE = Machine(memory_bytes=64 * GIB)  # fixed, so no outcome depends on the machine running the tests
SMALL_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128,
              "max_position_embeddings": 128}
# 64 layers x 16 kv heads x 64 dims in float32: 512 KiB of KV cache per token, 2 GiB per 4096-token sequence
BIG_TINY = {"hidden_size": 1024, "num_layers": 64, "num_heads": 16, "num_kv_heads": 16, "intermediate_size": 384,
            "max_position_embeddings": 4096}
BASE = {"model": {"path": "tiny", "tiny": SMALL_TINY},
        "rollout": {"n_samples": 4, "max_new_tokens": 8, "max_model_len": 96},
        "task": {"train_size": 16, "eval_size": 2, "prompts_per_step": 2},
        "algorithm": {"kl_mode": "in_reward", "kl_estimator": "k1"},
        "run": {"steps": 2, "eval_every": 1, "eval_n_samples": 2}}


def study_file(tmp_path, base_changes: dict | None = None, grid: dict | None = None):
    base = copy.deepcopy(BASE)
    for section, values in (base_changes or {}).items():
        base.setdefault(section, {}).update(values)
    data = {"name": "pre", "base": base, "grid": grid or {"run.seed": [0]}}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def refused(path, overrides=(), machine=MACHINE) -> str:
    with pytest.raises(SpecError) as info:
        check_study(load_study(path, overrides), machine)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_valid_base_passes_without_warnings(tmp_path):
    assert check_study(load_study(study_file(tmp_path)), MACHINE) == ()


def test_max_model_len_beyond_the_tiny_models_limit_names_the_field(tmp_path):
    path = study_file(tmp_path, {"rollout": {"max_model_len": 256}})
    assert refused(path).startswith(f"{path}: base: rollout.max_model_len: 256 exceeds the model's 128 "
                                    "(model.tiny.max_position_embeddings)")


def test_a_grid_value_beyond_the_limit_names_the_grid_value(tmp_path):
    path = study_file(tmp_path, grid={"rollout.max_model_len": [96, 1024]})
    assert refused(path).startswith(f"{path}: grid.rollout.max_model_len[1] (max_model_len=1024): "
                                    "rollout.max_model_len: 1024 exceeds")


def test_a_set_beyond_the_limit_names_the_set(tmp_path):
    message = refused(study_file(tmp_path), ["run.steps=3", "rollout.max_model_len=4096"])
    assert message.startswith("--set rollout.max_model_len=4096: rollout.max_model_len: 4096 exceeds"), message


def test_a_local_model_folder_is_read_for_its_limit(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 64, "num_attention_heads": 2,
                                                    "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}))
    path = study_file(tmp_path, {"model": {"path": str(folder)}})
    assert f"rollout.max_model_len: 96 exceeds the model's 64 (max_position_embeddings in {folder}/config.json)" \
        in refused(path)


def test_a_hub_id_in_the_local_hf_cache_is_read_for_its_limit(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--org--small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps({"max_position_embeddings": 80, "num_attention_heads": 2,
                                                      "hidden_size": 64, "num_hidden_layers": 2}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = study_file(tmp_path, {"model": {"path": "org/small"}})
    assert "rollout.max_model_len: 96 exceeds the model's 80 (max_position_embeddings in" in refused(path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # not cached here: the actor checks it
    assert check_study(load_study(path), MACHINE) == ()


def test_prompt_plus_max_new_tokens_beyond_max_model_len(tmp_path):
    path = study_file(tmp_path, {"rollout": {"max_new_tokens": 90}})  # prompt: 3 chat tokens + 8 letters
    assert refused(path).startswith(f"{path}: base: rollout.max_model_len: the longest prompt (11 tokens, "
                                    "task.max_letters=8) plus rollout.max_new_tokens (90) is 101 tokens")


def test_a_long_instruction_counts_in_the_prompt(tmp_path):
    path = study_file(tmp_path, {"task": {"instruction": "Make a palindrome. " * 5}})
    assert "the longest prompt (108 tokens" in refused(path)


def test_tiny_prompt_lengths_are_exact():
    """The byte-count shortcut equals the real tiny tokenizer on the real chat-formatted prompt."""
    from tasks.prompts import format_prompt
    from tasks.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    for task in ({"max_letters": 5}, {"max_letters": 9, "instruction": "Use <answer></answer> tags. ¿Sí?"}):
        config = Config.from_dict({"task": {**task, "min_letters": 4}})
        letters = "abcdefghi"[:task["max_letters"]]
        prompt = format_prompt(tokenizer, task.get("instruction", ""), letters)
        assert longest_prompt_tokens(config) == len(tokenizer(prompt)["input_ids"])


@pytest.mark.parametrize("changes, machine, field, words", [
    ({"task": {"train_size": 10**9}}, MACHINE, "task.train_size", "the train and eval splits"),
    ({"model": {"tiny": {**SMALL_TINY, "sft_examples": 10**8}}}, MACHINE, "model.tiny.sft_examples", "warm-start"),
    ({"task": {"eval_size": 4096}, "run": {"eval_n_samples": 256, "eval_every": 1}}, Machine(8 * GIB),
     "task.eval_size", "an eval batch"),
    ({"rollout": {"n_samples": 4096}, "learner": {"micro_batch_size": 16}}, Machine(64 * 2**20), "rollout.n_samples",
     "a step's batch"),
    ({"rollout": {"kv_cache_space_gib": 48, "num_workers": 2}}, MACHINE, "rollout.kv_cache_space_gib",
     "48 GiB of KV cache per rollout actor x rollout.num_workers (2)"),
])
def test_sizes_beyond_what_the_machine_holds_are_refused(tmp_path, changes, machine, field, words):
    path = study_file(tmp_path, changes)
    message = refused(path, machine=machine)
    assert message.startswith(f"{path}: base: {field}: ") and words in message, message
    assert "GiB" in message


def test_one_sequence_that_overflows_the_cpu_kv_cache(tmp_path):
    path = study_file(tmp_path, {"model": {"tiny": BIG_TINY}, "rollout": {"max_model_len": 4096}})
    assert refused(path).startswith(f"{path}: base: rollout.kv_cache_space_gib: one sequence of rollout.max_model_len"
                                    " = 4096 tokens needs 2.00 GiB of KV cache, more than rollout.kv_cache_space_gib")


def test_one_sequence_that_overflows_the_gpu_kv_cache(tmp_path):
    gpu = {"gpus_per_worker": 1, "gpu_memory_utilization": 0.5, "max_model_len": 512}
    path = study_file(tmp_path, {"model": {"tiny": {**SMALL_TINY, "max_position_embeddings": 512}}, "rollout": gpu})
    # 0.5 x 1 MiB of GPU memory leaves nothing once ~0.2 MiB of weights are loaded
    message = refused(path, machine=Machine(MACHINE.memory_bytes, gpu_memory_bytes=2**20))
    assert "rollout.gpu_memory_utilization: one sequence of rollout.max_model_len = 512 tokens" in message
    assert check_study(load_study(path), MACHINE) == ()  # no GPU on this driver: vLLM checks at actor start


def test_a_step_larger_than_the_kv_cache_is_a_warning_not_an_error(tmp_path):
    path = study_file(tmp_path, {"model": {"tiny": BIG_TINY}, "rollout": {"max_model_len": 1024}})
    warnings = check_study(load_study(path), MACHINE)  # 512 MiB per sequence: 2 of the 8 fit at once
    assert warnings == (f"{path}: base: rollout.kv_cache_space_gib: the KV cache holds 2 of the 8 sequences each "
                        "rollout actor samples at once (at rollout.max_model_len = 1024 tokens), so vLLM runs them in "
                        "up to 4 waves (slower rollouts, same results)",)


def test_the_rollout_actor_checks_the_limit_of_a_model_the_driver_could_not_see(tmp_path):
    from core.config import RolloutConfig
    from workers.rollout import check_model_len

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    check_model_len(tmp_path, RolloutConfig(max_model_len=64))
    with pytest.raises(ValueError, match=r"^rollout.max_model_len: 128 exceeds the model's max_position_embeddings 64"):
        check_model_len(tmp_path, RolloutConfig(max_model_len=128))
