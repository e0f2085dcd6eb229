"""One definition of a distinct valid answer: `Task.valid_answer`, fed "ABA"/"aba"-style variants through
every path that counts distinct valid answers: the task, per-group counts, the warm start's measurement
(`policy_eval.score_samples`), the trial's RL diversity metrics (`orchestrator.trial.diversity`) and the
coverage eval (`orchestrator.evaluation`: pass@k, coverage, novelty, entropy, distinct valid); the report
only tabulates the metrics those two log."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.config import TaskConfig
from core.diversity import distinct_answers
from orchestrator import evaluation
from orchestrator import trial as trial_mod
from tasks import distinct_valid_per_group, make_task
from tasks.palindrome import all_palindromes, valid_arrangements
from tasks.policy_eval import score_samples


@pytest.fixture(scope="module")
def task():
    return make_task(TaskConfig(train_size=64, eval_size=8, min_letters=6, max_letters=8))


def example_with(task, arrangements: int):
    """A train example with at least `arrangements` valid answers, and two of them (a != b)."""
    ex = next(e for e in task.train if valid_arrangements(e.metadata["letters"]) >= arrangements)
    a, b = all_palindromes(ex.metadata["letters"])[:2]
    return ex, a, b


def variants(answer: str) -> list[str]:
    """Responses that all give the same answer as reasoning-gym scores it (case and surrounding space)."""
    return [f"<answer>{answer}</answer>", f"<answer>{answer.upper()}</answer>", f"<answer> {answer} </answer>",
            f"<answer>{answer.capitalize()}</answer>"]


def test_valid_answer_is_normalised_as_the_scorer_normalises(task):
    ex, a, _ = example_with(task, 2)
    for response in variants(a):
        assert task.reward(response, ex) == 1.0  # reasoning-gym lower-cases and strips before checking
        assert task.valid_answer(response, ex) == a
    assert task.valid_answer("<answer>zzzzzzq</answer>", ex) is None
    assert task.valid_answer("", ex) is None
    assert task.valid_answers(variants(a) + ["nope"], [ex] * 5) == [a] * 4 + [None]
    with pytest.raises(ValueError):
        task.valid_answers(["x"], [ex, ex])


def test_format_reward_never_makes_an_answer_valid():
    t = make_task(TaskConfig(train_size=8, eval_size=2, format_reward=0.1))
    ex = t.train[0]
    assert t.reward("<answer>qqqqqqqqz</answer>", ex) == pytest.approx(0.1)
    assert t.valid_answer("<answer>qqqqqqqqz</answer>", ex) is None


def test_every_counting_path_agrees_on_case_variants(task):
    ex, a, b = example_with(task, 2)
    group1 = variants(a) + [f"<answer>{b.upper()}</answer>", f"<answer>{b}</answer>", "junk", ""]
    ex2, c, _ = example_with(task, 1)
    group2 = variants(c) + ["<answer>ABBA</answer>"] * 4  # a palindrome of other letters: not valid
    responses, examples = group1 + group2, [ex] * 8 + [ex2] * 8

    assert distinct_valid_per_group(task, responses, examples, group_size=8) == [2, 1]
    assert score_samples(task, responses, [ex, ex2], n=8) == {"accuracy": 10 / 16, "distinct_valid": 1.5}

    answers = task.valid_answers(responses, examples)
    diversity = distinct_answers(answers, [x is not None for x in answers], np.repeat([0, 1], 8))
    assert diversity["diversity/distinct_valid"] == 1.5


class ListRollout:
    """Returns fixed response texts in the RolloutBatch layout (the one field these paths read)."""

    def __init__(self, texts: list[str], n: int):
        self.texts, self.n = texts, n

    def generate(self, prompts, n, seed):
        assert n == self.n
        return SimpleNamespace(response_texts=self.texts, group_index=torch.arange(len(prompts)).repeat_interleave(n))


def test_trial_and_coverage_eval_count_case_variants_once(task):
    ex, a, b = example_with(task, 2)
    texts = variants(a) + [f"<answer>{b.upper()}</answer>", f"<answer>{b}</answer>", "junk", ""]
    batch = ListRollout(texts, 8).generate(["p"], 8, seed=0)
    trial = SimpleNamespace(task=task, embed=None)
    metrics = trial_mod.diversity(trial, batch, [ex])
    assert metrics["diversity/distinct_valid"] == 2.0  # ABA, aba, " aba " are one answer; B, b another
    assert metrics["diversity/distinct_answers"] == 3.0  # of any validity: a, b and "junk" (its last line)

    eval_task = SimpleNamespace(eval=[ex], reward=task.reward, valid_answers=task.valid_answers)
    answers, rewards = evaluation.sample_answers(ListRollout(texts, 8), eval_task, ["p"], 8, seed=0)
    assert answers == [[a] * 4 + [b, b, None, None]]
    # pi_ref said A..A and a..a (one answer, a) and nothing valid else: b is novel, a is covered
    reference = [[task.valid_answer(f"<answer>{x}</answer>", ex) for x in (a.upper(), a)] + [None] * 6]
    m = evaluation.coverage(answers, reference, rewards)
    assert m["eval/distinct_valid"] == 2.0
    assert m["eval/answer_coverage"] == 1.0 and m["eval/answer_novelty"] == 0.5
    assert m["eval/answer_entropy"] == pytest.approx(-(4 / 6) * np.log(4 / 6) - (2 / 6) * np.log(2 / 6))
    assert m["eval/pass_at_1"] == pytest.approx(6 / 8) and m["eval/pass_at_8"] == 1.0


def test_all_palindromes_are_the_valid_answers():
    letters = list("baabcdcd")  # half {a, b, c, d}: 4! arrangements
    answers = all_palindromes(letters)
    assert len(answers) == valid_arrangements(letters) == 24
    t = make_task(TaskConfig(train_size=4, eval_size=2))
    ex = t.train[0]
    for answer in all_palindromes(ex.metadata["letters"]):
        assert t.valid_answer(f"<answer>{answer.upper()}</answer>", ex) == answer
    assert valid_arrangements(list("aaaabbc")) == 3 and valid_arrangements(list("aaaa")) == 1
    with pytest.raises(ValueError, match="no palindrome"):
        all_palindromes(list("abc"))
