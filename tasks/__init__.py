"""Task families and the problem format."""

from tasks.base import CHECKERS, SPLITS, LabelCheck, LabelProposal, PositionCoupling, Problem, Solve, Task, verify
from tasks.registry import BUILTIN, allow, allow_from_setting, get_task, names, task_of

# the built-in families (they can generate problems; a user's JSONL task may not)
TASKS: dict[str, Task] = {name: get_task(name) for name in BUILTIN}

__all__ = ["CHECKERS", "SPLITS", "TASKS", "LabelCheck", "LabelProposal", "PositionCoupling", "Problem", "Solve", "Task", "allow", "allow_from_setting",
           "get_task", "names", "task_of", "verify"]
