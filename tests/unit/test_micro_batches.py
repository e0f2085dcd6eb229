"""Micro-batches by row count and by token budget (workers.sequence.pack_micro_batches)."""
from __future__ import annotations

import random

import pytest

from workers.sequence import pack_micro_batches


def _cost(group, prompts, responses):
    """Padded tokens of a micro-batch after trim_padding: rows x (longest prompt + longest response)."""
    return len(group) * (max(prompts[i] for i in group) + max(responses[i] for i in group))


def test_without_budget_rows_stay_in_order():
    assert pack_micro_batches([3] * 7, [5] * 7, max_rows=3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pack_micro_batches([3] * 4, [5] * 4, max_rows=8, min_count=3) == [[0], [1], [2, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_budget_packs_every_row_once_within_limits(seed):
    rng = random.Random(seed)
    n = 40
    prompts = [rng.randint(1, 30) for _ in range(n)]
    responses = [rng.randint(0, 200) for _ in range(n)]
    budget, max_rows = 400, 6
    groups = pack_micro_batches(prompts, responses, max_rows, budget)
    assert sorted(i for g in groups for i in g) == list(range(n))
    for g in groups:
        assert len(g) <= max_rows
        assert _cost(g, prompts, responses) <= budget or len(g) == 1  # a too-long row travels alone
    # Longest rows first, so a micro-batch holds rows of similar length and little padding.
    lengths = [prompts[i] + responses[i] for g in groups for i in g]
    assert lengths == sorted(lengths, reverse=True)
    padded = sum(_cost(g, prompts, responses) for g in groups)
    in_order = sum(_cost(list(range(i, min(i + max_rows, n))), prompts, responses) for i in range(0, n, max_rows))
    assert padded < in_order  # the control: packing by length beats row-order micro-batches


def test_a_row_longer_than_the_budget_travels_alone_and_counts_can_be_raised():
    groups = pack_micro_batches([10, 2, 2, 2], [100, 3, 3, 3], max_rows=4, max_tokens=40)
    assert groups == [[0], [1, 2, 3]]
    # Data-parallel ranks agree on the largest count: the fullest micro-batch is halved.
    assert pack_micro_batches([10, 2, 2, 2], [100, 3, 3, 3], 4, 40, min_count=3) == [[0], [1, 2], [3]]
    with pytest.raises(ValueError, match="cannot split 4 rows into 5"):
        pack_micro_batches([1] * 4, [1] * 4, 4, 40, min_count=5)
