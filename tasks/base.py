"""The task interface every RL task implements, and the per-group 'distinct valid answers' helper.

A task owns its data splits and its reward; the trial loop only calls `task.reward(response, example)`
per sampled row and never branches on the task's name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Example:
    """One prompt of a task: the question text, a reference answer, and what the reward needs."""

    question: str  # the question as put in the user turn (without the instruction)
    answer: str  # one reference answer (palindrome: one of possibly many valid ones)
    metadata: dict[str, Any] = field(default_factory=dict)  # task-specific (letters, source row, ...)


class Task(ABC):
    """A task: train/eval splits of Examples, answer extraction and a 0/1 (+ format) reward."""

    name: str = ""
    train: list[Example]
    eval: list[Example]

    @property
    @abstractmethod
    def default_instruction(self) -> str:
        """Instruction used when TaskConfig.instruction is '' (put before the question)."""

    @abstractmethod
    def extract_answer(self, response: str) -> str | None:
        """The final answer in a response, or None when there is none; never raises."""

    @abstractmethod
    def reward(self, response: str, example: Example) -> float:
        """1.0 for a correct answer, format_reward for a well-formed wrong one, else 0.0; never raises."""

    def normalize_answer(self, answer: str) -> str:
        """The form under which two correct answers count as the same (for distinct-answer counts)."""
        return answer.strip()


def distinct_valid_per_group(task: Task, responses: Sequence[str], examples: Sequence[Example],
                             group_size: int) -> list[int]:
    """Number of distinct correct answers in each group of `group_size` consecutive rows.

    responses/examples: B = G * group_size rows, rows of one prompt contiguous (the RolloutBatch layout).
    A row counts when its reward is >= 1 (so format reward never counts); answers are compared after
    `task.normalize_answer` (palindrome: stripped, lower-cased, as reasoning-gym scores them).
    Returns G ints in [0, group_size].
    """
    if group_size < 1 or len(responses) % group_size or len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses / {len(examples)} examples do not form groups of "
                         f"group_size={group_size}")
    counts = []
    for start in range(0, len(responses), group_size):
        seen = set()
        for response, example in zip(responses[start:start + group_size], examples[start:start + group_size]):
            if task.reward(response, example) >= 1.0:
                seen.add(task.normalize_answer(task.extract_answer(response) or ""))
        counts.append(len(seen))
    return counts


def distinct_valid_summary(counts: Sequence[int], group_size: int) -> dict[str, float]:
    """Mean raw count of distinct valid answers per prompt, and that count divided by group_size (n)."""
    mean = sum(counts) / len(counts) if counts else 0.0
    return {"diversity/distinct_valid": mean, "diversity/distinct_valid_frac": mean / group_size}
