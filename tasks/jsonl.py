"""Problems and demonstrations from JSON lines. A bad line is reported with its number and field; good lines are kept."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.base import CHECKERS, SPLITS, Problem

MAX_PROMPT_CHARS = 8192  # longer prompts are refused rather than truncated silently


@dataclass
class LineError:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _objects(path: Path, errors: list[LineError]):
    """(line number, JSON object) for every non-blank line; the others are reported in `errors`."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(LineError(str(path), number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            errors.append(LineError(str(path), number, "not a JSON object"))
            continue
        yield number, record


def _field_error(record: dict, known_tasks: set[str] | None) -> str | None:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "field 'prompt' is missing or not a non-empty string"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"field 'prompt' has {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}: shorten it"
    if "answer" in record and record["answer"] is not None and not isinstance(record["answer"], (str, int, float)):
        return "field 'answer' must be a string or a number"
    checker = record.get("checker", "exact")
    if checker not in CHECKERS:
        return f"field 'checker' is {checker!r}: use one of {', '.join(CHECKERS)}"
    split = record.get("split", "train")
    if split not in SPLITS:
        return f"field 'split' is {split!r}: use 'train' or 'heldout'"
    task = record.get("task")
    if task is not None and known_tasks is not None and task not in known_tasks:
        return f"field 'task' is {task!r}: not a known task ({', '.join(sorted(known_tasks))})"
    if "meta" in record and not isinstance(record["meta"], dict):
        return "field 'meta' must be an object"
    if "id" in record and not isinstance(record["id"], (str, int)):
        return "field 'id' must be a string"
    return None


def read_problems(path: str | Path, known_tasks: set[str] | None = None) -> tuple[list[Problem], list[LineError]]:
    path = Path(path)
    problems, errors = [], []
    for number, record in _objects(path, errors):
        problem_error = _field_error(record, known_tasks)
        if problem_error:
            errors.append(LineError(str(path), number, problem_error))
            continue
        answer = record.get("answer")
        problems.append(
            Problem(
                prompt=record["prompt"],
                answer=None if answer is None else str(answer),
                checker=record.get("checker", "exact"),
                task=record.get("task"),
                split=record.get("split", "train"),
                id=str(record.get("id") or f"{path.stem}-{number}"),
                difficulty=record.get("difficulty"),
                meta=record.get("meta", {}),
            )
        )
    return problems, errors


def read_demos(path: str | Path) -> tuple[list[dict], list[LineError]]:
    """Prompt/completion pairs for a warm start."""
    path = Path(path)
    demos, errors = [], []
    for number, record in _objects(path, errors):
        if not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
            errors.append(LineError(str(path), number, "needs string fields 'prompt' and 'completion'"))
            continue
        demos.append({"prompt": record["prompt"], "completion": record["completion"]})
    return demos, errors
