"""Built-in task families and the problem format."""

from agent.tasks.addition import Addition
from agent.tasks.base import CHECKERS, SPLITS, Problem, Task, verify

TASKS: dict[str, Task] = {"addition": Addition()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: built-in tasks are {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["CHECKERS", "SPLITS", "TASKS", "Problem", "Task", "get_task", "verify"]
