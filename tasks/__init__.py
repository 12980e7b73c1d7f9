"""Built-in task families and the problem format."""

from tasks.addition import Addition
from tasks.base import CHECKERS, SPLITS, LabelCheck, Problem, Solve, Task, verify

TASKS: dict[str, Task] = {"addition": Addition()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: built-in tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["CHECKERS", "SPLITS", "TASKS", "LabelCheck", "Problem", "Solve", "Task", "get_task", "verify"]
