"""What user-given text and ids may hold: one rule each, shared by the JSONL reader and the HTTP API.

Text must be storable: no NUL (PostgreSQL refuses it) and no lone surrogate (a JSON escape such as \\ud800 that
UTF-8 cannot encode). An id is text that also names one thing in logs, URLs and pages: not blank, bounded, and
without control characters (a newline in an id could forge a log line).
"""

from __future__ import annotations

import json
import re

from tasks.base import MAX_ID_CHARS

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def _shown(key: str) -> str:
    """A key as it may be printed: ASCII escapes only, so that an error line never carries the bad text itself."""
    return json.dumps(key)[1:-1][:40]


def _string_error(text: str, where: str) -> str | None:
    if "\x00" in text:
        return f"{where} contains a NUL character (\\u0000): remove it"
    found = _SURROGATE.search(text)
    if found:
        return (f"{where} contains a lone surrogate ({_shown(found.group())} at character {found.start() + 1}): "
                "not valid Unicode text; remove it or write the whole character")
    return None


def check_text(value, field: str) -> str | None:
    """The problem with `value` as stored text, or None: a string, or every key and string inside a JSON value
    (objects and lists walked without recursion, so any depth json.loads accepts is fine). `field` names it."""
    todo = [(value, field)]
    while todo:
        item, path = todo.pop()
        if isinstance(item, str):
            problem = _string_error(item, f"field '{path}'")
            if problem:
                return problem
        elif isinstance(item, dict):
            for key in filter(lambda k: isinstance(k, str), item):
                problem = _string_error(key, f"a key of field '{path}'" if path else "a field name")
                if problem:
                    return problem
            todo += [(v, f"{path}.{_shown(k)}" if path else _shown(k)) for k, v in reversed(item.items())]
        elif isinstance(item, list):
            todo += [(v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item)))]
    return None


def id_error(value, field: str = "id", max_chars: int = MAX_ID_CHARS) -> str | None:
    """The problem with `value` as an id (a problem id; a job id with max_chars=MAX_JOB_ID_CHARS), or None."""
    if not isinstance(value, str) or not value.strip() or len(value) > max_chars:
        return f"field '{field}' must be a non-blank string of at most {max_chars} characters"
    text_problem = check_text(value, field)
    if text_problem:
        return text_problem
    if _CONTROL.search(value):
        return f"field '{field}' contains a control character (a newline, a tab ...): remove it"
    return None
