"""core.diversity against hand-computed values and brute-force enumeration."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.diversity import (
    answer_entropy,
    coverage_metrics,
    distinct_answers,
    distinct_n,
    diversity_metrics,
    grouped_distinct_n,
    mean_pairwise_cosine,
    pass_at_k,
    pass_at_k_ks,
    pass_at_k_metrics,
)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c of them correct) that contain a correct one."""
    correct = set(range(c))
    subsets = list(itertools.combinations(range(n), k))
    return sum(bool(correct & set(s)) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form must not.
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(1000, 10, 500) == pytest.approx(1 - math.comb(990, 500) / math.comb(1000, 500))


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_pass_at_k_metrics_averages_prompts():
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    m = pass_at_k_metrics(correct)
    assert set(m) == {"eval/pass_at_1", "eval/pass_at_2", "eval/pass_at_4"}  # default k: 1, 2, 4 = n
    assert m["eval/pass_at_1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert m["eval/pass_at_2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["eval/pass_at_4"] == pytest.approx(2 / 3)
    assert set(pass_at_k_metrics(torch.tensor(correct), ks=[3, 1])) == {"eval/pass_at_1", "eval/pass_at_3"}
    assert not any("@" in k for k in pass_at_k_metrics(correct))  # MLflow keys cannot hold '@'


def test_pass_at_k_curve_ks():
    assert pass_at_k_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert pass_at_k_ks(6) == [1, 2, 4, 6] and pass_at_k_ks(1) == [1] and pass_at_k_ks(2) == [1, 2]
    with pytest.raises(ValueError, match="pass_at_k_ks"):
        pass_at_k_ks(0)


def test_distinct_n_hand_computed():
    # chars of "abab": bigrams ab, ba, ab -> 2 distinct / 3; with "abab" twice: 2 / 6.
    assert distinct_n(["abab"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["abab", "abab"], 2) == pytest.approx(2 / 6)
    assert distinct_n(["abc", "xyz"], 1) == 1.0
    assert distinct_n(["the cat the cat", "a dog"], 1, unit="word") == pytest.approx(4 / 6)
    assert math.isnan(distinct_n(["ab"], 3))  # no trigram at all
    with pytest.raises(ValueError, match="unit"):
        distinct_n(["ab"], 1, unit="token")


def test_grouped_distinct_n_is_per_prompt():
    # group 0: identical responses (1 distinct char of 4), group 1: all different (4 of 4).
    m = grouped_distinct_n(["aa", "aa", "ab", "cd"], [0, 0, 1, 1], ns=[1])
    assert m == {"diversity/distinct_1": pytest.approx((0.25 + 1.0) / 2)}


def test_identical_responses_have_cosine_one_and_one_answer():
    emb = np.tile(np.array([[0.3, -1.0, 2.0]]), (4, 1))
    assert mean_pairwise_cosine(emb, [0, 0, 0, 0]) == pytest.approx(1.0)
    m = distinct_answers(["abba"] * 4, [True] * 4, [0, 0, 0, 0])
    assert m == {"diversity/distinct_valid": 1.0, "diversity/distinct_answers": 1.0}


def test_orthogonal_responses_have_cosine_zero():
    assert mean_pairwise_cosine(np.eye(4) * 3.0, torch.tensor([0, 0, 0, 0])) == pytest.approx(0.0)


def test_cosine_averages_groups_and_skips_singletons():
    e = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [5, 5]], dtype=float)
    # group 0 cosine 1; group 1 = rows (1,0) and (0,1): cosine 0; group 2 has one row: skipped.
    assert mean_pairwise_cosine(e, [0, 0, 1, 1, 2]) == pytest.approx(0.5)
    assert math.isnan(mean_pairwise_cosine(e[:2], [0, 1]))
    with pytest.raises(ValueError, match="embeddings"):
        mean_pairwise_cosine(e, [0, 0])


def test_distinct_answers_counts_valid_and_any():
    answers = ["aba", "aba", "bab", None, "xyz", "xyz", "abc", None]
    valid = [True, True, True, False, False, False, False, False]
    m = distinct_answers(answers, valid, [0, 0, 0, 0, 1, 1, 1, 1])
    # prompt 0: valid {aba, bab} = 2, any {aba, bab} = 2; prompt 1: valid 0, any {xyz, abc} = 2.
    assert m == {"diversity/distinct_valid": 1.0, "diversity/distinct_answers": 2.0}


def test_answer_entropy_hand_computed():
    assert answer_entropy(["aba", "aba", None, "aba"]) == 0.0  # one answer: no uncertainty
    assert answer_entropy(["aba", "bab", None, None]) == pytest.approx(math.log(2))  # invalid samples left out
    # counts 2, 1, 1 of 4: -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 1.5 log 2
    assert answer_entropy(["x", "x", "y", "z"]) == pytest.approx(1.5 * math.log(2))
    assert math.isnan(answer_entropy([None, None])) and math.isnan(answer_entropy([]))


def test_coverage_metrics_hand_computed():
    ref = [["aba", "bab", "aba", None],  # S_ref = {aba, bab}
           ["cc", None, None, None],  # S_ref = {cc}
           [None, None, None, None]]  # S_ref empty: skipped by coverage
    pi = [["aba", "aba", "xyx", None],  # S_pi = {aba, xyx}: covers 1/2, novelty 1/2, entropy H(2/3, 1/3)
          [None, None, None, None],  # S_pi empty: covers 0/1, skipped by novelty and entropy
          ["dd", "ee", None, None]]  # novelty 2/2 (pi_ref found nothing), entropy log 2
    m = coverage_metrics(pi, ref)
    assert set(m) == {"eval/answer_coverage", "eval/answer_novelty", "eval/answer_entropy", "eval/distinct_valid"}
    assert m["eval/answer_coverage"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["eval/answer_novelty"] == pytest.approx((1 / 2 + 1) / 2)
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert m["eval/answer_entropy"] == pytest.approx((h + math.log(2)) / 2)
    assert m["eval/distinct_valid"] == pytest.approx((2 + 0 + 2) / 3)


def test_coverage_of_pi_ref_against_itself():
    ref = [["aba", "bab", None], ["cc", "cc", "cc"]]
    m = coverage_metrics(ref, ref)
    assert m["eval/answer_coverage"] == 1.0 and m["eval/answer_novelty"] == 0.0
    assert m["eval/answer_entropy"] == pytest.approx(math.log(2) / 2)


def test_coverage_metrics_all_invalid_and_bad_input():
    m = coverage_metrics([[None, None]], [[None, None]])
    assert math.isnan(m["eval/answer_coverage"]) and math.isnan(m["eval/answer_novelty"])
    assert math.isnan(m["eval/answer_entropy"]) and m["eval/distinct_valid"] == 0.0
    collapsed = coverage_metrics([[None, None]], [["aba", "bab"]])  # the policy lost every answer
    assert collapsed["eval/answer_coverage"] == 0.0 and math.isnan(collapsed["eval/answer_novelty"])
    with pytest.raises(ValueError, match="coverage_metrics: valid_answers has 1 prompts but ref_valid_answers has 2"):
        coverage_metrics([["a"]], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no eval prompts"):
        coverage_metrics([], [])


def test_distinct_answers_compares_normalised_answers_as_given():
    # normalising is the task's job (Task.valid_answer); given un-normalised strings they stay distinct
    assert distinct_answers(["ABA", "aba"], [True, True], [0, 0])["diversity/distinct_valid"] == 2.0
    assert distinct_answers(["aba", "aba"], [True, True], [0, 0])["diversity/distinct_valid"] == 1.0


def test_diversity_metrics_keys():
    m = diversity_metrics(["aba", "aba"], ["aba", "aba"], [True, True], [0, 0], embeddings=np.ones((2, 3)))
    assert set(m) == {"diversity/distinct_valid", "diversity/distinct_answers", "diversity/embed_cos",
                      *(f"diversity/distinct_{n}" for n in range(1, 5))}
    assert all(isinstance(v, float) for v in m.values())
    assert "diversity/embed_cos" not in diversity_metrics(["a"], ["a"], [True], [0])


def test_core_diversity_imports_no_heavy_framework():
    code = ("import sys, core.diversity; bad = {'ray', 'vllm', 'deepspeed', 'mlflow', 'sentence_transformers',"
            " 'transformers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
