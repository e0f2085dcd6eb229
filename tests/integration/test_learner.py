"""The DeepSpeed learner in-process (real DeepSpeed on CPU, gloo, world size 1): scoring, the PPO update,
its loss normalisation, checkpoints, ZeRO-3/bf16 and bad input.

One tiny random Qwen2 serves the module; its output layer is scaled up so next-token distributions are
peaked and a log-prob at a wrong position differs by far more than the tolerances used here.
"""
from __future__ import annotations

import pytest
import torch

from core.config import Config, TinyModelConfig
from core.types import RolloutBatch, TrainBatch

pytestmark = pytest.mark.timeout(600)  # bounded even on a loaded machine (idle: ~1 min)

B, P, T = 8, 6, 9


def make_config(**dotted) -> Config:
    base = {"learner.lr": 1e-3, "learner.micro_batch_size": 4, "rollout.n_samples": 2, "task.prompts_per_step": 4}
    return Config().replace(**{**base, **dotted})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tasks.tiny_model import build_tiny_model

    folder = build_tiny_model(TinyModelConfig(num_layers=2, seed=5), tmp_path_factory.mktemp("tiny") / "policy")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(folder)
    return folder


def synthetic_batch(vocab: int, seed: int = 0, rows: int = B) -> RolloutBatch:
    """Random tokens with ragged left-padded prompts and right-padded responses (lengths 1..T)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(2, P + 1, (rows,), generator=g)
    t_len = torch.randint(1, T + 1, (rows,), generator=g)
    t_len[0] = T
    prompt_mask = torch.arange(P) >= (P - p_len)[:, None]
    response_mask = torch.arange(T) < t_len[:, None]
    prompt_ids = torch.randint(10, vocab, (rows, P), generator=g).masked_fill(~prompt_mask, 0)
    response_ids = torch.randint(10, vocab, (rows, T), generator=g).masked_fill(~response_mask, 0)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(rows, T),
                        torch.arange(rows) // 2, ["stop"] * rows, [""] * rows, [""] * rows, pad_token_id=0)


def train_batch(batch: RolloutBatch, scores, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(batch.batch_size, 1, generator=g).expand(-1, batch.response_ids.shape[1])
    return TrainBatch(batch, scores.logprobs, scores.ref_logprobs, (adv * batch.response_mask).contiguous())


def hf_logprobs(model_dir, batch: RolloutBatch) -> torch.Tensor:
    """Reference implementation: each row unpadded, through a plain HF forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = torch.zeros(batch.response_ids.shape)
    for row in range(batch.batch_size):
        prompt = batch.prompt_ids[row][batch.prompt_mask[row]]
        response = batch.response_ids[row][batch.response_mask[row]]
        with torch.no_grad():
            logits = model(torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1:-1]
        out[row, :len(response)] = logits.log_softmax(-1).gather(-1, response[:, None]).squeeze(-1)
    return out


@pytest.fixture(scope="module")
def learner(model_dir):
    from workers.learner import LearnerWorker

    return LearnerWorker(model_dir, make_config())


@pytest.fixture(scope="module")
def vocab(learner) -> int:
    return learner.engine.module.config.vocab_size


def weights(learner) -> dict[str, torch.Tensor]:
    return dict(learner.export_weights())


def test_score_matches_unpadded_forward(learner, model_dir, vocab):
    batch = synthetic_batch(vocab)
    scores = learner.score(batch)
    mask = batch.response_mask
    expected = hf_logprobs(model_dir, batch)
    assert (scores.logprobs - expected).abs().max() < 1e-5  # padding and positions handled as vLLM does
    assert torch.equal(scores.logprobs, scores.ref_logprobs)  # reference = initial policy
    assert scores.exact_kl_reverse.abs().max() < 1e-6 and scores.exact_kl_forward.abs().max() < 1e-6
    assert (scores.entropy[mask] > 0).all()
    for t in (scores.logprobs, scores.entropy, scores.exact_kl_reverse):
        assert (t[~mask] == 0).all() and t.shape == (B, T)


def test_update_raises_logprob_of_positive_advantage_and_moves_kl(model_dir, vocab):
    from workers.learner import LearnerWorker

    lrn = LearnerWorker(model_dir, make_config())
    batch = synthetic_batch(vocab, seed=1)
    before = lrn.score(batch)
    tb = train_batch(batch, before, seed=1)
    metrics = lrn.update(tb)
    after = lrn.score(batch)
    seq_gain = ((after.logprobs - before.logprobs) * batch.response_mask).sum(1)
    positive = tb.advantages[:, 0] > 0
    assert seq_gain[positive].mean() > 0 > seq_gain[~positive].mean()
    assert (after.exact_kl_reverse[batch.response_mask] > 0).all()  # the policy left the reference
    assert torch.equal(after.ref_logprobs, before.ref_logprobs)  # the reference is frozen
    assert metrics["learner/tokens"] == batch.response_mask.sum() and metrics["learner/grad_norm"] > 0
    assert metrics["learner/optimizer_steps"] == 1 and metrics["learner/lr"] == 1e-3


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
def test_update_is_invariant_to_micro_batch_size(model_dir, vocab, loss_agg):
    """Global normalisation: 1 micro-batch of 8 and 4 of 2 rows (ragged lengths) give the same step."""
    from workers.learner import LearnerWorker

    batch = synthetic_batch(vocab, seed=2)
    results = []
    for micro in (8, 2):
        lrn = LearnerWorker(model_dir, make_config(**{"learner.micro_batch_size": micro,
                                                       "algorithm.loss_agg": loss_agg}))
        metrics = lrn.update(train_batch(batch, lrn.score(batch), seed=2))
        results.append((weights(lrn), metrics))
    (w_one, m_one), (w_acc, m_acc) = results
    # A mean of micro-batch means would change the gradient by O(10%) on these ragged rows.
    assert m_one["learner/grad_norm"] == pytest.approx(m_acc["learner/grad_norm"], rel=1e-5)
    assert m_one["loss/total"] == pytest.approx(m_acc["loss/total"], abs=1e-6)
    # Adam's first step is ~lr * sign(grad): entries whose grad is ~eps amplify float noise, hence 5% of lr.
    assert max((w_one[k] - w_acc[k]).abs().max() for k in w_one) < 0.05 * 1e-3


def test_checkpointing_and_token_budget_change_no_result_under_zero_0_2_3(model_dir, vocab):
    """Gradient checkpointing + a token budget (uneven micro-batches of 1, 1, 2, 3 and 1 rows, packed by
    length, not in row order) give the plain learner's scores, row for row, and its update, under every
    ZeRO stage: only memory and float summation order change."""
    from workers.learner import LearnerWorker
    from workers.sequence import pack_micro_batches

    batch = synthetic_batch(vocab, seed=3)
    budget = 24  # tokens per micro-batch; rows here have 3..15 tokens
    packs = pack_micro_batches(batch.prompt_mask.sum(1).tolist(), batch.response_mask.sum(1).tolist(), 4, budget)
    order = [i for p in packs for i in p]
    assert sorted(len(p) for p in packs) == [1, 1, 1, 2, 3] and order != sorted(order)
    plain = LearnerWorker(model_dir, make_config(**{"learner.micro_batch_size": 8}))
    scores = plain.score(batch)
    metrics = plain.update(train_batch(batch, scores, seed=2))
    expected = weights(plain)
    for stage in (0, 2, 3):
        lrn = LearnerWorker(model_dir, make_config(**{
            "learner.zero_stage": stage, "learner.gradient_checkpointing": True,
            "learner.max_tokens_per_micro_batch": budget}))
        got = lrn.score(batch)
        for field in ("logprobs", "ref_logprobs", "entropy", "exact_kl_reverse"):
            assert torch.allclose(getattr(got, field), getattr(scores, field), atol=1e-6), (stage, field)
        m = lrn.update(train_batch(batch, got, seed=2))
        assert m["learner/grad_norm"] == pytest.approx(metrics["learner/grad_norm"], rel=1e-5), stage
        assert m["loss/total"] == pytest.approx(metrics["loss/total"], abs=1e-6), stage
        w = weights(lrn)
        assert max((w[k] - expected[k]).abs().max() for k in expected) < 0.05 * 1e-3, stage


def test_checkpoint_restores_logprobs_and_continues_identically(model_dir, vocab, tmp_path):
    from workers.learner import LearnerWorker

    config = make_config(**{"learner.ppo_epochs": 2, "learner.mini_batches": 2})
    first, second = synthetic_batch(vocab, seed=3), synthetic_batch(vocab, seed=4)
    a = LearnerWorker(model_dir, config)
    a.update(train_batch(first, a.score(first), seed=3))
    a.save_checkpoint(tmp_path / "ckpt")
    b = LearnerWorker(model_dir, config)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.steps == a.steps == 4
    scores_a, scores_b = a.score(second), b.score(second)
    assert torch.equal(scores_a.logprobs, scores_b.logprobs)
    assert torch.equal(scores_a.ref_logprobs, scores_b.ref_logprobs)
    m_a = a.update(train_batch(second, scores_a, seed=4))  # Adam moments restored too, or this diverges
    m_b = b.update(train_batch(second, scores_b, seed=4))
    w_a, w_b = weights(a), weights(b)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a) and m_a == m_b


def test_zero3_bf16_exact_kl_in_loss(model_dir, vocab):
    """ZeRO-3 shards the policy; export gathers it whole under the HF names vLLM loads."""
    from transformers import AutoModelForCausalLM

    from workers.learner import LearnerWorker

    config = make_config(**{"learner.zero_stage": 3, "model.dtype": "bfloat16", "algorithm.kl_mode": "in_loss",
                            "algorithm.kl_estimator": "exact_forward", "algorithm.kl_coef": 0.1})
    lrn = LearnerWorker(model_dir, config)
    batch = synthetic_batch(vocab, seed=6)
    for _ in range(2):
        scores = lrn.score(batch)
        metrics = lrn.update(train_batch(batch, scores, seed=6))
    assert scores.exact_kl_forward[batch.response_mask].mean() > 0  # second pass: moved off the reference
    assert metrics["loss/kl"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    exported = lrn.export_weights()
    hf_names = {n for n, _ in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}
    assert {n for n, _ in exported} == hf_names and "lm_head.weight" in hf_names
    assert all(t.dtype == torch.bfloat16 and t.numel() > 0 for _, t in exported)
    # The collective sync sends the same tensors under the same names, gathered bucket by bucket.
    received = receive_broadcast(lrn, bucket_bytes=4096)
    assert [n for n, _ in received] == [n for n, _ in exported]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(received, exported))


def receive_broadcast(learner, bucket_bytes: int) -> list[tuple[str, torch.Tensor]]:
    """What a receiver (a thread here, a vLLM worker in a trial) gets from learner.broadcast_weights."""
    from concurrent.futures import ThreadPoolExecutor

    from workers.weight_transfer import WeightReceiver

    port, metas = learner.listen_weight_sync("127.0.0.1", 60), learner.weight_metas()

    def receive():
        receiver = WeightReceiver("127.0.0.1", port, 1, 2, "gloo", metas, bucket_bytes, 60, torch.device("cpu"))
        got = [(name, t.clone()) for name, t in receiver.receive()]
        receiver.close()
        return got

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(receive)
        learner.join_weight_sync(2, "gloo")
        sent = learner.broadcast_weights(bucket_bytes)
        received = future.result(timeout=60)
    learner.close_weight_sync()
    assert sent >= sum(t.numel() * t.element_size() for _, t in received)
    return received


def test_missing_model_folder(tmp_path):
    from workers.learner import LearnerWorker

    with pytest.raises(FileNotFoundError, match="model_path: no Hugging Face model folder"):
        LearnerWorker(tmp_path / "absent", make_config())


def test_vocab_mismatch(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.learner import LearnerWorker

    other = AutoModelForCausalLM.from_pretrained(model_dir)
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other.save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match="reference_path: vocabulary mismatch"):
        LearnerWorker(model_dir, make_config(), reference_path=tmp_path / "bigger")
