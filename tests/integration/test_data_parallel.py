"""Two DeepSpeed learner actors over gloo (real Ray, real DeepSpeed on CPU).

Ranks see different rows yet must hold bit-identical weights after every step (DeepSpeed all-reduces the
gradients), and the pair must match one process trained on the concatenated batch: the loss is
normalised over the whole mini-batch across ranks, so data parallelism changes only float summation
order. The ranks run ZeRO-2 with a token budget per micro-batch, so their shards pack into uneven
micro-batches whose number they must agree on; the single process runs plain row micro-batches.
Also: a batch that does not split over the ranks is refused before dispatch, leaving the actors alive.
"""
from __future__ import annotations

import json

import pytest
import torch

from core.config import Config, TinyModelConfig
from core.types import RolloutBatch, TrainBatch

pytestmark = pytest.mark.timeout(600)  # bounded even on a loaded machine (idle: ~1 min)

B, P, T, STEPS = 8, 5, 8, 3


BUDGET = 18  # tokens per micro-batch: the ranks' shards pack into different numbers of micro-batches


def make_config(**dotted) -> Config:
    base = {"learner.lr": 1e-3, "learner.micro_batch_size": 2, "learner.num_workers": 2,
            "rollout.n_samples": 2, "task.prompts_per_step": 4, "rollout.num_workers": 1}
    return Config().replace(**{**base, **dotted})


def local_micro_batch_counts(batch: TrainBatch) -> list[int]:
    from workers.sequence import pack_micro_batches

    shards = [batch.shard(rank, 2).rollout for rank in range(2)]
    return [len(pack_micro_batches(s.prompt_mask.sum(1).tolist(), s.response_mask.sum(1).tolist(), 2, BUDGET))
            for s in shards]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(TinyModelConfig(num_layers=2, seed=7), tmp_path_factory.mktemp("tiny") / "policy")


def synthetic_train_batch(vocab: int, seed: int) -> TrainBatch:
    """Ragged random rows; old/ref log-probs = 0 is fine: ratio clipping is what the test exercises."""
    g = torch.Generator().manual_seed(seed)
    t_len = torch.randint(1, T + 1, (B,), generator=g)
    prompt_mask = torch.arange(P) >= (P - torch.randint(1, P + 1, (B,), generator=g))[:, None]
    response_mask = torch.arange(T) < t_len[:, None]
    batch = RolloutBatch(torch.randint(10, vocab, (B, P), generator=g) * prompt_mask, prompt_mask,
                         torch.randint(10, vocab, (B, T), generator=g) * response_mask, response_mask,
                         torch.zeros(B, T), torch.arange(B) // 2, ["stop"] * B, [""] * B, [""] * B)
    old = -torch.rand(B, T, generator=g) * 5 * response_mask
    adv = torch.randn(B, 1, generator=g) * response_mask
    return TrainBatch(batch, old, old.clone(), adv)


@pytest.fixture(scope="module")
def trained(ray_session, model_dir):
    """Run STEPS updates on two actors; return (per-rank weights, metrics, the batches used)."""
    from workers.actors import LearnerGroup
    from workers.engines import create_placement_group

    # ZeRO-2 reduces gradients at every backward, so the ranks must agree on their micro-batch count.
    config = make_config(**{"learner.zero_stage": 2, "learner.max_tokens_per_micro_batch": BUDGET})
    pg = create_placement_group(config, rollouts=False)
    group = LearnerGroup(model_dir, config, pg)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    batches = [synthetic_train_batch(vocab, seed) for seed in range(STEPS)]
    metrics = [group.update(b) for b in batches]
    per_rank = ray_session.get([a.export_weights.remote(every_rank=True) for a in group.actors])
    with pytest.raises(ValueError, match="does not split over learner.num_workers=2"):
        group.update(synthetic_train_batch(vocab, 9).rows(slice(0, 7)))
    alive = ray_session.get([a.ping.remote() for a in group.actors], timeout=60)
    group.shutdown()
    ray_session.util.remove_placement_group(pg)
    return [dict(w) for w in per_rank], metrics, batches, alive


def test_ranks_bit_identical(trained):
    (rank0, rank1), metrics, _, _ = trained
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert metrics[-1]["learner/tokens"] > 0 and metrics[-1]["learner/optimizer_steps"] == STEPS


def test_matches_single_process_on_concatenated_batch(trained, model_dir):
    """Two ZeRO-2 ranks with uneven, length-packed micro-batches against one plain ZeRO-0 process."""
    from workers.learner import LearnerWorker

    (rank0, _), metrics, batches, _ = trained
    assert any(len(set(local_micro_batch_counts(b))) > 1 for b in batches)  # the ranks had to agree on a count
    single = LearnerWorker(model_dir, make_config(**{"learner.num_workers": 1}))
    single_metrics = [single.update(b) for b in batches]
    weights = dict(single.export_weights())
    diff = max((weights[k] - rank0[k]).abs().max().item() for k in weights)
    print(f"\nmax |single process - 2 ranks| after {STEPS} steps: {diff:.2e}")
    assert diff < 5e-5  # summation order only (Adam amplifies ~eps-sized grads; lr = 1e-3)
    for ours, theirs in zip(metrics, single_metrics):
        assert ours["learner/tokens"] == theirs["learner/tokens"]
        assert ours["learner/grad_norm"] == pytest.approx(theirs["learner/grad_norm"], rel=1e-4)


def test_indivisible_batch_refused_before_dispatch(trained):
    *_, alive = trained
    assert alive == [0, 1]
