"""Problems and demonstrations from JSON lines. A bad line is reported with its number and field; good lines are kept.

A problem without an `id` gets one from its content (`Problem.content_id`), so the same problem has the same id in
any file and two different problems never share one. An id used twice in one file is reported on the later line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.base import CHECKERS, MAX_TASK_CHARS, SPLITS, Problem, compile_regex
from tasks.text import check_text, id_error

MAX_PROMPT_CHARS = 8192  # longer prompts are refused rather than truncated silently
MAX_ANSWER_CHARS = 8192
MAX_DIFFICULTY = 2**31 - 1  # the store's integer column


@dataclass
class LineError:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _objects(path: Path, errors: list[LineError]):
    """(line number, JSON object) for every non-blank line; the others are reported in `errors`.

    Lines are split on newlines only (a U+2028 inside a JSON string is text, not a line break) and decoded one by
    one, so a line that is not UTF-8 is reported alone."""
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(LineError(str(path), number, f"not UTF-8 text (byte {raw[exc.start]:#04x} at byte {exc.start + 1})"))
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte order mark written by some editors
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            errors.append(LineError(str(path), number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except (ValueError, RecursionError) as exc:  # NaN/Infinity, an integer of thousands of digits, deep nesting
            errors.append(LineError(str(path), number, f"not valid JSON ({type(exc).__name__}: {str(exc)[:120]})"))
            continue
        if not isinstance(record, dict):
            errors.append(LineError(str(path), number, "not a JSON object"))
            continue
        yield number, record


def _field_error(record: dict, known_tasks: set[str] | None) -> str | None:
    text_problem = check_text(record, "")  # every field: a NUL or a lone surrogate cannot be stored
    if text_problem:
        return text_problem
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "field 'prompt' is missing or not a non-empty string"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"field 'prompt' has {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}: shorten it"
    answer = record.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            return "field 'answer' must be a string or a number"
        if isinstance(answer, str) and len(answer) > MAX_ANSWER_CHARS:
            return f"field 'answer' has {len(answer)} characters, over the limit of {MAX_ANSWER_CHARS}: shorten it"
    checker = record.get("checker", "exact")
    if not isinstance(checker, str) or checker not in CHECKERS:
        return f"field 'checker' is {checker!r}: use one of {', '.join(CHECKERS)}"
    if checker == "regex":
        if answer is None:
            return "field 'answer' is required with checker 'regex' (the pattern a completion must match)"
        try:
            compile_regex(str(answer))
        except ValueError as exc:
            return f"field 'answer' {exc}"
    split = record.get("split", "train")
    if not isinstance(split, str) or split not in SPLITS:
        return f"field 'split' is {split!r}: use 'train' or 'heldout'"
    task = record.get("task")
    if task is not None:
        if not isinstance(task, str) or not task or len(task) > MAX_TASK_CHARS:
            return f"field 'task' must be a non-empty string of at most {MAX_TASK_CHARS} characters"
        if known_tasks is not None and task not in known_tasks:
            return f"field 'task' is {task!r}: not a known task ({', '.join(sorted(known_tasks))})"
    difficulty = record.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, int)
                                   or not 0 <= difficulty <= MAX_DIFFICULTY):
        return f"field 'difficulty' is {json.dumps(difficulty)[:40]}: use a whole number from 0 to {MAX_DIFFICULTY}"
    if "meta" in record and record["meta"] is not None and not isinstance(record["meta"], dict):
        return "field 'meta' must be an object"
    problem_id = record.get("id")
    if problem_id is not None:
        if isinstance(problem_id, bool) or not isinstance(problem_id, (str, int)):
            return "field 'id' must be a string"
        return id_error(str(problem_id))
    return None


def read_problems(path: str | Path, known_tasks: set[str] | None = None,
                  default_task: str | None = None) -> tuple[list[Problem], list[LineError]]:
    """Problems from a JSONL file and the bad lines; `default_task` is the task of lines that name none."""
    path = Path(path)
    problems, errors = [], []
    seen: dict[str, tuple[int, dict]] = {}  # id -> (line, content) of its first good line
    for number, record in _objects(path, errors):
        problem_error = _field_error(record, known_tasks)
        if problem_error:
            errors.append(LineError(str(path), number, problem_error))
            continue
        answer = record.get("answer")
        problem = Problem(
            prompt=record["prompt"],
            answer=None if answer is None else str(answer),
            checker=record.get("checker", "exact"),
            task=record.get("task", default_task),
            split=record.get("split", "train"),
            difficulty=record.get("difficulty"),
            meta=record.get("meta") or {},
        )
        given = record.get("id")
        problem.id = str(given) if given is not None else problem.content_id()
        if problem.id in seen:
            first, content = seen[problem.id]
            what = "repeats the problem" if content == problem.content() else "gives a different problem the id"
            errors.append(LineError(str(path), number, f"{what} {problem.id!r} of line {first}: "
                                                       "each problem once, each id for one problem"))
            continue
        seen[problem.id] = (number, problem.content())
        problems.append(problem)
    return problems, errors


def read_demos(path: str | Path) -> tuple[list[dict], list[LineError]]:
    """Prompt/completion pairs for a warm start."""
    path = Path(path)
    demos, errors = [], []
    for number, record in _objects(path, errors):
        if not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
            errors.append(LineError(str(path), number, "needs string fields 'prompt' and 'completion'"))
            continue
        text_problem = check_text(record["prompt"], "prompt") or check_text(record["completion"], "completion")
        if text_problem:
            errors.append(LineError(str(path), number, text_problem))
            continue
        demos.append({"prompt": record["prompt"], "completion": record["completion"]})
    return demos, errors
