"""Submitting work to the queue, written once for `arbor submit` and the HTTP API (arbor/api/service.py).

    search = job_search({"strategy": "mcts", "simulations": 3})     # checked, with the job defaults filled in
    problems = read_problem_file(path)                               # every bad line named, or SubmitError
    job_ids = submit_jobs(store, problems, rounds=refine, search=search)
    check_broker(url); queue_submitted(store, job_ids, refine)       # BrokerError when the broker fails

Each refusal is a SubmitError with one line (and, for a problem file, its bad lines); the CLI prints it, the API
answers it with a status code. Imports no typer and no web framework, so that neither surface loads the other.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

from agent.run_store import PLAIN_NAME  # one plain path component: an uploaded file's name, a run's folder
from search import SearchConfig

# a job's search unless the request says otherwise (and `arbor search`'s): adaptive search once the version has a
# calibrated value model, beam before (it won at equal budget: docs/benchmarks.md); every other default is
# SearchConfig's own
JOB_SEARCH = SearchConfig(strategy="auto")


class SubmitError(ValueError):
    """A refused submission: one line, and for a problem file its bad lines (tasks/jsonl.py LineError)."""

    def __init__(self, message: str, errors: list | None = None):
        super().__init__(message)
        self.errors = errors


class BrokerError(SubmitError):
    """The broker cannot be reached, or failed part-way through sending."""


# the search configuration ---------------------------------------------------------------------------------------
def _accepts(hint, value) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    if get_origin(hint) is Literal:  # the values themselves are SearchConfig's to check, with its own message
        return any(isinstance(value, type(v)) for v in get_args(hint))
    if get_origin(hint) is Union or type(hint).__name__ == "UnionType":
        return any(_accepts(h, value) for h in get_args(hint))
    return isinstance(value, hint)


def _name(hint) -> str:
    if get_origin(hint) is Literal:
        return " or ".join(sorted({type(v).__name__ for v in get_args(hint)}))
    if get_origin(hint) is Union or type(hint).__name__ == "UnionType":
        return " or ".join(_name(h) for h in get_args(hint))
    return "null" if hint is type(None) else hint.__name__


def check_search_fields(given: dict) -> None:
    """Every key a SearchConfig field and every value of its type (JSON from a file or a request)."""
    valid = [f.name for f in fields(SearchConfig)]
    hints = get_type_hints(SearchConfig)
    for name, value in given.items():
        if name not in valid:
            raise SubmitError(f"unknown search field {name!r}: valid fields are {', '.join(valid)}")
        if not _accepts(hints[name], value):
            raise SubmitError(f"search field {name!r} must be {_name(hints[name])} (got {json.dumps(value)})")


def job_search(given: dict) -> dict:
    """The whole validated configuration a job carries (JSON-safe: run_job rebuilds it with SearchConfig(**...)):
    JOB_SEARCH with the given fields over it."""
    check_search_fields(given)
    try:
        return asdict(SearchConfig(**{**asdict(JOB_SEARCH), **given}))
    except ValueError as exc:
        raise SubmitError(f"bad search configuration: {exc}") from None


# problems ------------------------------------------------------------------------------------------------------
def read_problem_file(path: Path, source: str | None = None, default_task: str | None = None) -> list:
    """The problems of a JSONL file (tasks/jsonl.py read_problems); a bad line or an empty file refuses them all.
    source: how messages name the file (default: its path)."""
    from tasks import names
    from tasks.jsonl import read_problems

    source = source or str(path)
    problems, errors = read_problems(path, known_tasks=names(), default_task=default_task)
    if errors:
        raise SubmitError(f"{len(errors)} bad line(s) in {source}; nothing was submitted: fix them and submit again",
                          errors)
    if not problems:
        raise SubmitError(f"{source} holds no problems")
    return problems


def read_problem_text(text: str, filename: str, source: str) -> list:
    """read_problem_file for text that arrived over HTTP: written to a private temporary folder under its own file
    name, so that checks, messages and ids are the CLI's."""
    with tempfile.TemporaryDirectory(prefix="arbor-upload-") as tmp:
        path = Path(tmp) / filename
        path.write_text(text, encoding="utf-8")
        return read_problem_file(path, source)


def decode_upload(raw: bytes, filename: str | None) -> tuple[str, str]:
    """(the name to show, the text) of an uploaded problem file; a name with a path or odd characters is replaced."""
    name = Path(filename or "").name
    name = name if PLAIN_NAME.fullmatch(name) else "upload.jsonl"
    try:
        return name, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubmitError(f"{name} is not UTF-8 text (byte {exc.start}): nothing was submitted") from None


# the queue -----------------------------------------------------------------------------------------------------
def check_broker(url: str) -> None:
    """Ping the broker before anything is stored, so that a request it would strand is refused whole."""
    import redis

    from agent.settings import mask

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:
        raise BrokerError(f"cannot reach the broker at {mask(url)} ({type(exc).__name__})") from None


def send_jobs(job_ids: list[str], kinds: list[str]) -> None:
    """Send stored jobs to the workers (the job id is the task id); BrokerError names how many were not sent."""
    from workers.app import app as celery_app
    from workers.recovery import send

    sent = 0
    try:
        for job_id, kind in zip(job_ids, kinds):
            send(celery_app, job_id, kind)
            sent += 1
    except Exception as exc:
        raise BrokerError(f"{len(job_ids) - sent} of {len(job_ids)} jobs are in the store but not queued "
                          f"({type(exc).__name__}: {exc}): run `arbor requeue` once the broker is back") from None


def queue_submitted(store, job_ids: list[str], refine: int) -> None:
    """Send a submission's jobs that are still queued: the same submission again sends what a failure left."""
    from agent.jobs import unsent

    pending = unsent(store, job_ids)
    send_jobs(pending, ["refine" if refine > 1 else "solve"] * len(pending))


def send_train_cycle():
    """Queue one train cycle for a worker on the train queue; its AsyncResult (the id becomes its job id)."""
    from workers.app import app as celery_app

    return celery_app.send_task("arbor.train_cycle", queue="train")

