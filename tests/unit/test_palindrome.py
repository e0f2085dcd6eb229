"""Palindrome task: real reasoning-gym entries, reward edge cases, splits and distinct-answer counts."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from core.config import TaskConfig
from tasks import distinct_valid_per_group, make_task
from tasks.palindrome import letters_key


@pytest.fixture(scope="module")
def task():
    return make_task(TaskConfig(name="palindrome", train_size=64, eval_size=16, min_letters=5, max_letters=7,
                                compact_prompt=True))


def other_palindrome(example) -> str | None:
    """A valid palindrome of the example's letters that differs from reasoning-gym's reference answer."""
    ref = example.answer
    half, middle = ref[: len(ref) // 2], ref[len(ref) // 2: len(ref) - len(ref) // 2]
    for perm in itertools.permutations(half):
        cand = "".join(perm) + middle + "".join(reversed(perm))
        if cand != ref:
            return cand
    return None


def an_example_with_alternatives(task):
    return next(ex for ex in task.train if other_palindrome(ex) is not None)


def test_another_valid_palindrome_scores_one(task):
    ex = an_example_with_alternatives(task)
    alt = other_palindrome(ex)
    assert alt != ex.answer and alt == alt[::-1]
    assert task.reward(f"<answer>{alt}</answer>", ex) == 1.0
    assert task.reward(f"<answer>{ex.answer}</answer>", ex) == 1.0


def test_near_misses_score_zero(task):
    ex = an_example_with_alternatives(task)
    ref = ex.answer
    wrong_letter = ("z" if ref[0] != "z" else "y") + ref[1:-1] + ("z" if ref[0] != "z" else "y")
    not_palindrome = ref[1:] + ref[0] if ref[1:] + ref[0] != (ref[1:] + ref[0])[::-1] else ref[:-1] + "q"
    for response in (f"<answer>{wrong_letter}</answer>", f"<answer>{not_palindrome}</answer>",
                     f"<answer>The palindrome is {ref}</answer>", f"<answer>{ref}{ref[0]}</answer>",
                     f"<answer>{ref[:-1]}</answer>"):
        assert task.reward(response, ex) == 0.0, response


def test_partial_credit_is_not_passed_on(task):
    """reasoning-gym gives 0.02/0.05 to wrong strings; the reward must be exactly 0 for them."""
    ex = task.train[0]
    assert task._score("zz", {"metadata": ex.metadata}) in (0.02, 0.05)
    assert task.reward("<answer>zz</answer>", ex) == 0.0


def test_malformed_empty_and_long_completions_score_zero(task):
    ex = task.train[0]
    for response in ("", "   \n  ", "<answer></answer>", f"<answer>{ex.answer}", "a" * 100_000,
                     "<answer>" * 5000, None):
        assert task.reward(response, ex) == 0.0


def test_extraction_last_tags_then_last_line(task):
    assert task.extract_answer("<answer>ab</answer> then <answer>aba</answer>") == "aba"
    assert task.extract_answer("thinking...\nabcba\n\n") == "abcba"
    assert task.extract_answer("") is None
    ex = task.train[0]
    assert task.reward(f"Let me think.\n{ex.answer}\n", ex) == 1.0  # fallback: last non-empty line


def test_format_reward_only_for_well_formed_wrong_answers(task):
    cfg = dataclasses.replace(task.cfg, format_reward=0.1)
    t = make_task(cfg)
    ex = t.train[0]
    assert t.reward("<answer>zzzzzq</answer>", ex) == pytest.approx(0.1)
    assert t.reward("zzzzzq", ex) == 0.0
    assert t.reward("<answer></answer>", ex) == 0.0
    assert t.reward(f"<answer>{ex.answer}</answer>", ex) == 1.0


def test_splits_disjoint_sized_and_compact(task):
    assert len(task.train) == 64 and len(task.eval) == 16
    train_keys = {letters_key(e.metadata["letters"]) for e in task.train}
    assert not train_keys & {letters_key(e.metadata["letters"]) for e in task.eval}
    for ex in task.train + task.eval:
        assert 5 <= len(ex.metadata["letters"]) <= 7
        assert ex.question == "".join(sorted(ex.metadata["letters"]))  # compact: just the letters
    assert task.default_instruction == ""


def test_full_prompt_uses_reasoning_gym_wording():
    t = make_task(TaskConfig(train_size=8, eval_size=4, compact_prompt=False))
    assert "palindrome" in t.train[0].question and "<answer>" in t.default_instruction


def test_splits_deterministic_by_seed():
    a = make_task(TaskConfig(train_size=16, eval_size=4, data_seed=7))
    b = make_task(TaskConfig(train_size=16, eval_size=4, data_seed=7))
    c = make_task(TaskConfig(train_size=16, eval_size=4, data_seed=8))
    assert [e.answer for e in a.train] == [e.answer for e in b.train]
    assert [e.answer for e in a.eval] == [e.answer for e in b.eval]
    assert [e.answer for e in a.train] != [e.answer for e in c.train]


def test_distinct_valid_answers_per_group(task):
    ex = an_example_with_alternatives(task)
    alt = other_palindrome(ex)
    group = [f"<answer>{ex.answer}</answer>", f"<answer>{alt}</answer>", f"<answer> {alt.upper()} </answer>",
             "<answer>nope</answer>"]
    other = task.train[1]
    group2 = ["x", "", f"<answer>{other.answer}</answer>", f"<answer>{other.answer}</answer>"]
    counts = distinct_valid_per_group(task, group + group2, [ex] * 4 + [other] * 4, group_size=4)
    assert counts == [2, 1]  # case/space variants of one answer count once (reasoning-gym normalises them)
    with pytest.raises(ValueError):
        distinct_valid_per_group(task, group, [ex] * 4, group_size=3)


def test_unknown_task_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed"):
        make_task(dataclasses.replace(TaskConfig(), name="chess"))
