"""Task families by name.

Three sources: the built-in families; families installed as entry points of the `arbor.tasks` group (a
package's `[project.entry-points."arbor.tasks"]`, `name = "module:Class"`); and `module:Class` specs that the
operator names (the command line's `--task`, or `ARBOR_TASKS` for workers). A problem's `task` field chooses
among these; it never names a module to import by itself, so a problem file or a queue message selects code
that the operator installed or named and runs none of its own.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points

from tasks.addition import Addition
from tasks.base import Task
from tasks.reversal import Reversal

ENTRY_POINT_GROUP = "arbor.tasks"
BUILTIN: dict[str, type[Task]] = {"addition": Addition, "reversal": Reversal}
_allowed: dict[str, type[Task]] = {}  # module:Class specs named by the operator in this process
_instances: dict[str, Task] = {}


def _task_class(obj, where: str) -> type[Task]:
    if isinstance(obj, Task):
        obj = type(obj)
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise ValueError(f"{where} is not an arbor Task subclass")
    return obj


@lru_cache(maxsize=1)
def _installed() -> dict[str, object]:
    """Entry points of the `arbor.tasks` group by name (loaded only when used)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def allow(spec: str) -> str:
    """Make `spec` usable as a task name in this process: a registered name is returned as is; `module:Class`
    is imported and checked. Raises ValueError with one line saying what is wrong."""
    if spec in BUILTIN or spec in _installed() or spec in _allowed:
        return spec
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"unknown task {spec!r}: use a registered name ({', '.join(sorted(names()))}) or "
                         "module:Class of an importable Task subclass")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task {spec!r}: cannot import {module_name!r} ({exc}); is it installed?") from None
    if not hasattr(module, class_name):
        raise ValueError(f"task {spec!r}: module {module_name!r} has no {class_name!r}")
    _allowed[spec] = _task_class(getattr(module, class_name), f"task {spec!r}")
    return spec


def allow_from_setting(specs: str | None) -> None:
    """ARBOR_TASKS: comma-separated module:Class specs a worker may run."""
    for spec in filter(None, (s.strip() for s in (specs or "").split(","))):
        allow(spec)


def names() -> set[str]:
    return set(BUILTIN) | set(_installed()) | set(_allowed)


def get_task(name: str) -> Task:
    """The task registered under `name` (one instance per process)."""
    if name not in _instances:
        if name in BUILTIN:
            cls = BUILTIN[name]
        elif name in _allowed:
            cls = _allowed[name]
        elif name in _installed():
            cls = _task_class(_installed()[name].load(), f"entry point {name!r} of {ENTRY_POINT_GROUP}")
        else:
            raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(sorted(names()))}; a module:Class "
                             "task must be named with --task (or ARBOR_TASKS on workers) first")
        task = cls()
        task.name = name  # what problems of this task carry in their `task` field
        _instances[name] = task
    return _instances[name]


def task_of(problem) -> Task:
    """A problem's task: the one it names, the generic Task() when it names none."""
    return get_task(problem.task) if problem.task is not None else Task()
