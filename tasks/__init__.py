"""Tasks and rewards: `make_task(TaskConfig) -> Task` picks the task by name (registry, no branching)."""
from __future__ import annotations

from core.config import TaskConfig
from tasks.base import Example, Task, distinct_valid_per_group


def _palindrome(cfg: TaskConfig) -> Task:
    from tasks.palindrome import PalindromeTask

    return PalindromeTask(cfg)


def _deepscaler(cfg: TaskConfig) -> Task:
    from tasks.deepscaler import DeepScaleRTask

    return DeepScaleRTask(cfg)


TASK_REGISTRY = {"palindrome": _palindrome, "deepscaler": _deepscaler}


def make_task(cfg: TaskConfig) -> Task:
    """The task named by cfg.name; ValueError listing the known names otherwise."""
    if cfg.name not in TASK_REGISTRY:
        raise ValueError(f"task.name: unknown task {cfg.name!r}; allowed: {sorted(TASK_REGISTRY)}")
    return TASK_REGISTRY[cfg.name](cfg)


__all__ = ["Example", "Task", "make_task", "distinct_valid_per_group", "TASK_REGISTRY"]
