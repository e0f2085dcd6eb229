"""The task interface every RL task implements, its one definition of a valid answer, and per-group counts.

A task owns its data splits and its reward; the trial loop only calls `task.reward(response, example)`
per sampled row and never branches on the task's name. `task.valid_answer(response, example)` is the
single definition of "a valid answer" (normalised as the task's scorer normalises): the warm start's
measurement, the RL diversity metrics, the eval coverage metrics and the report all count distinct
valid answers through it (`core.diversity` then receives already-normalised answers).
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
        """The form the task's scorer compares answers in (default: stripped); two valid answers are the
        same answer when their normalised forms are equal."""
        return answer.strip()

    def valid_answer(self, response: str, example: Example) -> str | None:
        """The one definition of a valid answer: the response's answer, normalised as the scorer
        normalises it, when the response earns the full reward (>= 1, so format reward never counts);
        None otherwise. Everything that counts distinct valid answers goes through here."""
        return self.normalized_answer(response) if self.reward(response, example) >= 1.0 else None

    def normalized_answer(self, response: str) -> str | None:
        """The response's answer of any validity in the normal form `valid_answer` uses (None: no answer)."""
        answer = self.extract_answer(response)
        return None if answer is None else self.normalize_answer(answer)

    def valid_answers(self, responses: Sequence[str], examples: Sequence[Example]) -> list[str | None]:
        """`valid_answer` row by row (B responses, B examples -> B answers or None)."""
        if len(responses) != len(examples):
            raise ValueError(f"valid_answers: {len(responses)} responses but {len(examples)} examples")
        return [self.valid_answer(r, ex) for r, ex in zip(responses, examples)]


def distinct_valid_per_group(task: Task, responses: Sequence[str], examples: Sequence[Example],
                             group_size: int) -> list[int]:
    """Number of distinct valid answers (`task.valid_answer`) in each group of `group_size` consecutive rows.

    responses/examples: B = G * group_size rows, rows of one prompt contiguous (the RolloutBatch layout).
    Returns G ints in [0, group_size].
    """
    if group_size < 1 or len(responses) % group_size or len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses / {len(examples)} examples do not form groups of "
                         f"group_size={group_size}")
    answers = task.valid_answers(responses, examples)
    return [len({a for a in answers[start:start + group_size] if a is not None})
            for start in range(0, len(answers), group_size)]
