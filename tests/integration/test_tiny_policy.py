"""The warm-started tiny reference policy (cached under the test run dir) and model-path resolution.

The first run builds the policy (build + warm start, a few minutes on 2 cores, recorded in
warm_start.json); later runs load the cache. Accuracy is re-measured here with HF sampling at T=1.0.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ModelConfig, TaskConfig
from tasks import make_task
from tasks.policy import resolve_policy, tiny_cache_key
from tasks.policy_eval import measure
from tasks.prompts import resolve_instruction

BUILD = ("import sys; from pathlib import Path; from core.config import ModelConfig, TaskConfig; "
         "from tasks.policy import resolve_policy; resolve_policy(ModelConfig(path='tiny'), Path(sys.argv[1]), "
         "TaskConfig())")


@pytest.fixture(scope="module")
def tiny_folder(run_dir) -> Path:
    # Built in a fresh process: earlier tests ran vLLM (which pins this process's OpenMP threads to
    # cores) and DeepSpeed ZeRO-3 (which patches F.linear globally) in-process, and either one makes
    # the warm start here many times slower. The build is cached, so the in-process call is a hit.
    subprocess.run([sys.executable, "-c", BUILD, str(run_dir)], check=True, timeout=1200,
                   cwd=Path(__file__).resolve().parents[2])
    return resolve_policy(ModelConfig(path="tiny"), run_dir, TaskConfig())


def test_tiny_policy_is_cached_by_config_hash(tiny_folder, run_dir):
    assert tiny_folder.name == f"tiny-{tiny_cache_key(ModelConfig().tiny, TaskConfig())}"
    assert tiny_folder.parent == Path(run_dir) / "models"
    report = json.loads((tiny_folder / "warm_start.json").read_text())
    assert 0.2 <= report["eval_accuracy"] <= 0.8
    assert resolve_policy(ModelConfig(path="tiny"), run_dir, TaskConfig()) == tiny_folder  # cache hit


def test_tiny_policy_accuracy_and_diversity_at_temperature_one(tiny_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # shared 2-core machine: one thread is faster under contention
    task_cfg = TaskConfig()
    task = make_task(task_cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    instruction = resolve_instruction(task_cfg.instruction, task.default_instruction)
    result = measure(model, tokenizer, task, task.eval, instruction, n=8,
                     max_new_tokens=task_cfg.max_letters + 4, seed=123)
    assert 0.2 <= result["accuracy"] <= 0.8, result
    assert result["distinct_valid"] > 1.0, result


def test_any_hf_folder_is_accepted(tiny_folder):
    assert resolve_policy(ModelConfig(path=str(tiny_folder)), "unused") == tiny_folder.resolve()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_policy(ModelConfig(path=str(tmp_path / "nope")), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_policy(ModelConfig(path="./models/missing"), tmp_path)


def test_folder_without_config_or_tokenizer_is_a_clear_error(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    with pytest.raises(ValueError, match="missing config.json, tokenizer.json or tokenizer_config.json"):
        resolve_policy(ModelConfig(path=str(folder)), tmp_path)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="missing tokenizer.json"):
        resolve_policy(ModelConfig(path=str(folder)), tmp_path)
    file = tmp_path / "model.bin"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_policy(ModelConfig(path=str(file)), tmp_path)


def test_hub_id_is_returned_as_is(tmp_path):
    assert resolve_policy(ModelConfig(path="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"), tmp_path) == \
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
