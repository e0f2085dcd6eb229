"""Palindrome generation (reasoning-gym `palindrome_generation`): many valid answers per prompt.

Prompts: reasoning-gym entries, `seed`/`size`/letter counts from TaskConfig. The train split uses seeds
data_seed .. data_seed+train_size-1 (reasoning-gym seeds entry i with `seed + i`), the eval split
starts at data_seed + train_size, so no entry is shared; eval entries whose letter multiset occurs in
train are dropped too (a palindrome question is its multiset). `compact_prompt` puts only the
sorted letters in the question ("ooz"), for the tiny model; otherwise reasoning-gym's wording.

Answer: the text inside the last `<answer>...</answer>`; with no closed tag pair, the last non-empty
line of the response. Reward: 1.0 only when reasoning-gym's own `score_answer` gives exactly 1.0
(it gives 0.02/0.05 partial credit to wrong strings, which we do not pass on); `format_reward` for a
wrong answer given inside well-formed tags. A valid answer (`Task.valid_answer`) is normalised as
`score_answer` normalises before checking: stripped and lower-cased, so "ABA" and " aba " are one answer.

Room to diversify: a prompt of L letters has one valid answer per distinct arrangement of its half
(L // 2 letters; repeats reduce the count, the middle letter is forced), so at most 1, 2, 6, 24 for
L = 2-3, 4-5, 6-7, 8-9. reasoning-gym draws the half's letters uniformly with replacement; with the
default 5-8 letters the mean is 8.65 valid answers per prompt (1.96 / 5.66 / 5.66 / 21.3 for L = 5, 6,
7, 8), 7.5 on the default 32-prompt eval split (`valid_arrangements`).
"""
from __future__ import annotations

import itertools
import math
import re
from collections import Counter

from core.config import TaskConfig
from tasks.base import Example, Task

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Responses past this length are scored 0 without looking (a runaway sample cannot cost time).
MAX_RESPONSE_CHARS = 20_000
EVAL_OVERSAMPLE = 4  # eval candidates generated per wanted eval prompt, before de-duplication

FULL_INSTRUCTION = ("Form a palindrome that uses every given letter exactly once. Put only the palindrome "
                    "inside <answer></answer> tags, e.g. <answer>abcba</answer>.")


def _dataset(seed: int, size: int, cfg: TaskConfig):
    import reasoning_gym

    return reasoning_gym.create_dataset("palindrome_generation", seed=seed, size=size,
                                        min_length=cfg.min_letters, max_length=cfg.max_letters)


def letters_key(letters) -> str:
    """A letter multiset as a sorted string (the identity of a palindrome question)."""
    return "".join(sorted(letters))


def compact_question(letters) -> str:
    """The tiny-model question: the letter multiset, sorted, no separators ('ooz').

    Sorted because the question *is* the multiset: a ~1M-parameter model then spends its capacity on
    choosing an arrangement (where the task's many valid answers, and so its diversity, live) instead
    of on counting scrambled letters, which it learns too slowly for a minutes-long warm start.
    """
    return "".join(sorted(letters))


def half_and_middle(letters) -> tuple[list[str], str]:
    """The sorted half of a palindrome multiset and its middle letter ('' for even lengths).

    Raises ValueError when more than one letter has an odd count (no palindrome uses them all).
    """
    counts = Counter(letters)
    odd = sorted(letter for letter, c in counts.items() if c % 2)
    if len(odd) > 1:
        raise ValueError(f"letters {letters_key(letters)!r} form no palindrome: odd counts of {odd}")
    half = [letter for letter in sorted(counts) for _ in range(counts[letter] // 2)]
    return half, (odd[0] if odd else "")


def valid_arrangements(letters) -> int:
    """How many distinct palindromes use exactly these letters: the multinomial of the half's counts."""
    half, _ = half_and_middle(letters)
    return math.factorial(len(half)) // math.prod(math.factorial(c) for c in Counter(half).values())


def all_palindromes(letters) -> list[str]:
    """Every valid answer (lower-case) for these letters, sorted; len == valid_arrangements(letters)."""
    half, middle = half_and_middle(letters)
    return sorted({"".join(p) + middle + "".join(reversed(p)) for p in itertools.permutations(half)})


def question_for(letters, compact: bool) -> str:
    """The question for scrambled `letters`: compact, or reasoning-gym's own wording."""
    if compact:
        return compact_question(letters)
    from reasoning_gym.algorithmic.palindrome_generation import QUESTION_TEMPALTE

    return QUESTION_TEMPALTE.format(letters=", ".join(letters))


class PalindromeTask(Task):
    """reasoning-gym palindrome_generation with disjoint train/eval splits."""

    name = "palindrome"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        train_ds = _dataset(cfg.data_seed, cfg.train_size, cfg)
        self.train = [self._example(e) for e in train_ds]
        seen = {letters_key(e.metadata["letters"]) for e in self.train}
        eval_ds = _dataset(cfg.data_seed + cfg.train_size, max(cfg.eval_size * EVAL_OVERSAMPLE, 16), cfg)
        self.eval = []
        for entry in eval_ds:
            key = letters_key(entry["metadata"]["letters"])
            if key not in seen and len(self.eval) < cfg.eval_size:
                seen.add(key)
                self.eval.append(self._example(entry))
        self._score = train_ds.score_answer

    def _example(self, entry: dict) -> Example:
        letters = entry["metadata"]["letters"]
        question = compact_question(letters) if self.cfg.compact_prompt else entry["question"]
        return Example(question=question, answer=entry["answer"], metadata=dict(entry["metadata"]))

    @property
    def default_instruction(self) -> str:
        # Compact prompts carry no instruction: the tiny model learns the format in its warm start.
        return "" if self.cfg.compact_prompt else FULL_INSTRUCTION

    def extract_answer(self, response: str) -> str | None:
        if not response or len(response) > MAX_RESPONSE_CHARS:
            return None
        tagged = ANSWER_RE.findall(response)
        if tagged:
            return tagged[-1]
        lines = [line.strip() for line in response.splitlines() if line.strip()]
        return lines[-1] if lines else None

    def is_correct(self, answer: str | None, example: Example) -> bool:
        """reasoning-gym's verdict is exactly 1.0 (right letters, right counts, a palindrome)."""
        if answer is None:
            return False
        return self._score(answer, {"metadata": example.metadata}) == 1.0

    def reward(self, response: str, example: Example) -> float:
        answer = self.extract_answer(response)
        if self.is_correct(answer, example):
            return 1.0
        well_formed = bool(ANSWER_RE.search(response or "")) and bool(answer and answer.strip())
        return self.cfg.format_reward if well_formed else 0.0

    def normalize_answer(self, answer: str) -> str:
        return answer.strip().lower()
