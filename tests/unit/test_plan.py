"""The memory model behind `klrl plan` (orchestrator/plan.py): its structure, the seed studies' verdicts
and the CLI's refusals. Its figures are compared with measured CPU peaks in docs/BENCHMARKS.md
(benchmarks/learner_memory.py --report)."""
from __future__ import annotations

import json

import pytest

from core.config import Config
from orchestrator import cli, plan

R1 = plan.KNOWN_ARCHS["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]
SEEDS = ("search_spaces/seed_palindrome_r1_1p5b.yaml", "search_spaces/seed_deepscaler_r1_1p5b.yaml")


def _config(**dotted) -> Config:
    base = {"model.dtype": "bfloat16", "learner.num_workers": 2, "learner.micro_batch_size": 8,
            "task.prompts_per_step": 8, "rollout.max_new_tokens": 2048, "rollout.max_model_len": 2560,
            "learner.kl_chunk_size": 1024}
    return Config().replace(**{**base, **dotted})


def test_parameter_count_of_the_seed_model():
    assert R1.params == 1_777_088_000  # hidden 1536, 28 layers, GQA 12/2, MLP 8960, untied 151,936 vocab


def test_memory_grows_linearly_in_length_with_a_slope_that_chunking_and_checkpointing_set():
    config = _config(**{"learner.micro_batch_size": 1})
    for ckpt in (False, True):
        c = config.replace(**{"learner.gradient_checkpointing": ckpt})
        peaks = [plan.learner_memory(R1, c, 512 + t, t).peak_update for t in (2048, 4096, 8192, 16384)]
        steps = [b - a for a, b in zip(peaks, peaks[1:])]
        assert all(s > 0 for s in steps)
        # Linear once T > the chunk (the 4-D attention mask adds a small quadratic term).
        assert steps[2] == pytest.approx(2 * steps[1], rel=0.15) and steps[1] == pytest.approx(2 * steps[0], rel=0.15)
    # The slope is set by the hidden size and the layers, not by the vocabulary: a 10x vocabulary
    # moves the intercept (weights, one chunk) but hardly the slope.
    big_vocab = plan.Arch(**{**R1.__dict__, "vocab": 10 * R1.vocab})
    slope = [plan.learner_memory(a, config, 4608, 4096).peak_update - plan.learner_memory(a, config, 2560, 2048)
             .peak_update for a in (R1, big_vocab)]
    assert slope[1] == pytest.approx(slope[0], rel=0.01)
    chunk = plan.learner_memory(R1, config, 2560, 2048).parts["logits chunk"]
    # One chunk of bf16 logits + 3 float32 buffers, and the head's gradient summed over the chunks.
    assert chunk == pytest.approx(1024 * R1.vocab * (2 + 12) + 2 * R1.vocab * R1.hidden)
    exact = plan.learner_memory(R1, config.replace(**{"algorithm.kl_mode": "in_loss",
                                                      "algorithm.kl_estimator": "exact_forward"}), 2560, 2048)
    assert exact.parts["logits chunk"] > 1.3 * chunk  # the reference's logits share the chunk


def test_zero_shards_optimizer_state_master_weights_and_gradients_over_ranks():
    n = R1.params

    def parts(stage, workers):
        c = _config(**{"learner.zero_stage": stage, "learner.num_workers": workers, "task.prompts_per_step": 8})
        return plan.learner_memory(R1, c, 2560, 2048).parts
    z0, z2w1, z2w4, z3w4 = parts(0, 1), parts(2, 1), parts(2, 4), parts(3, 4)
    assert z0["Adam states"] == 8 * n and z0["fp32 master weights"] == 4 * n
    assert z2w4["Adam states"] == z2w1["Adam states"] / 4 and z2w4["fp32 master weights"] == 4 * n / 4
    assert z2w4["policy weights"] == 2 * n  # ZeRO-2 keeps whole weights
    assert z3w4["policy weights"] < 2 * n / 2  # ZeRO-3 shards them (plus one gathered layer and the head)
    assert z3w4["reference weights"] == 2 * n  # the reference is never sharded
    assert z2w4["gradients (peak)"] < z0["gradients (peak)"]


def test_checkpointing_and_token_budget_cut_activations():
    plain = plan.learner_memory(R1, _config(), 2560, 2048)
    ckpt = plan.learner_memory(R1, _config(**{"learner.gradient_checkpointing": True}), 2560, 2048)
    budget = plan.learner_memory(R1, _config(**{"learner.max_tokens_per_micro_batch": 5120}), 2560, 2048)
    assert ckpt.parts["activations"] < plain.parts["activations"] / 5
    assert budget.parts["activations"] < plain.parts["activations"] / 3  # 5,120 tokens instead of 8 x 2,560
    # A row longer than the budget still runs, alone: the budget never drops below one row.
    assert plan.micro_batch_tokens(_config(**{"learner.max_tokens_per_micro_batch": 100}), 2560) == 2560


def test_architecture_from_a_local_folder_and_from_tiny(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 1000, "tie_word_embeddings": True}))
    arch = plan.resolve_arch(Config().replace(**{"model.path": str(tmp_path)}))
    assert arch == plan.Arch(64, 3, 4, 2, 96, 1000, tied=True)
    assert plan.resolve_arch(Config()).vocab == 266  # the tiny byte tokenizer
    with pytest.raises(plan.PlanError, match="model.path: no config.json at 'org/unknown'"):
        plan.resolve_arch(Config().replace(**{"model.path": "org/unknown"}))


@pytest.mark.parametrize("space", SEEDS)
def test_seed_studies_fit_one_80_gib_gpu_per_learner_and_rollout(space, capsys):
    assert cli.main(["plan", space, "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "Learner GPU" in out and "Rollout GPU" in out and "GPU-hours" in out
    assert out.count("fits:") == 2
    assert cli.main(["validate", space, "--gpu-memory-gib", "80"]) == 0


def test_a_study_that_does_not_fit_is_refused_naming_the_fields(capsys):
    args = ["--set", "learner.gradient_checkpointing=false", "--set", "learner.max_tokens_per_micro_batch=0",
            "--set", "learner.micro_batch_size=16"]
    assert cli.main(["plan", SEEDS[0], *args, "--gpu-memory-gib", "80"]) == 2
    err = capsys.readouterr().err
    assert "learner GPU needs" in err and "learner.gradient_checkpointing" in err
    assert "learner.max_tokens_per_micro_batch" in err
    assert cli.main(["validate", SEEDS[0], *args, "--gpu-memory-gib", "80"]) == 2
    assert "learner.gradient_checkpointing" in capsys.readouterr().err
    # Rollout: vLLM's share of a small GPU cannot hold 256 sequences of 5,120 tokens.
    assert cli.main(["plan", SEEDS[1], "--gpu-memory-gib", "40"]) == 2
    assert "rollout.gpu_memory_utilization" in capsys.readouterr().err


def test_gpu_hours_scale_with_steps_and_measured_throughput():
    config = _config(**{"learner.gpus_per_worker": 1.0, "rollout.gpus_per_worker": 1.0, "run.eval_every": 0})
    base = plan.trial_time(R1, config, plan.GPUS["h100"])
    assert base.gpus == 2 + 1  # 2 learner ranks + 1 rollout worker
    faster = plan.trial_time(R1, config, plan.GPUS["h100"], learner_tps=2 * base.learner_tokens_per_s,
                             rollout_tps=2 * base.rollout_tokens_per_s)
    assert faster.hours(100) == pytest.approx(base.hours(100) / 2)
    assert base.hours(200) == pytest.approx(2 * base.hours(100))
