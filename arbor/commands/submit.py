"""`arbor submit`: problems in, one job per problem, each carrying the whole validated search configuration.

    arbor submit problems.jsonl [--refine 3] [--wait]
    arbor submit problems.jsonl --search-config search.json                     # a JSON object of SearchConfig fields
    arbor submit problems.jsonl --search-config search.json --simulations 3     # a flag overrides the file
    arbor submit long.jsonl --memory     # every job through the context memory (without the flag: only the
                                         # problems longer than the policy's trained window, automatically)

The configuration is validated here (SearchConfig's own checks; an unknown field is named) and stored whole in the
job's params, so that the worker (agent/jobs.py run_job) searches with exactly what was submitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional, Union, get_args, get_origin, get_type_hints, Literal

import typer

from arbor.cli import app
from arbor.commands.jobs import _check_broker, _enqueue, _fail, _run_in_process, _settings, _store, _wait
from arbor.commands.search import CLI_SEARCH
from arbor.options import option
from search import SearchConfig
from workers.config import QueueConfig

JOB_SEARCH = CLI_SEARCH  # a job's search unless the file or a flag says otherwise


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


def read_search_config(path: Path) -> dict:
    """The SearchConfig fields in a JSON file, type-checked; any problem ends the command with one line."""
    if not path.is_file():
        _fail(f"{path} does not exist: pass a JSON file holding an object of search settings (SearchConfig fields)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _fail(f"{path} is not valid JSON: {exc}")
    if not isinstance(data, dict):
        _fail(f"{path} must hold a JSON object of SearchConfig fields (got {type(data).__name__})")
    valid = [f.name for f in fields(SearchConfig)]
    hints = get_type_hints(SearchConfig)
    for name, value in data.items():
        if name not in valid:
            _fail(f"{path}: unknown search field {name!r}: valid fields are {', '.join(valid)}")
        if not _accepts(hints[name], value):
            _fail(f"{path}: search field {name!r} must be {_name(hints[name])} (got {json.dumps(value)})")
    return data


@app.command()
def submit(
    file: Path = typer.Argument(..., help="problems, one JSON object a line"),
    refine: int = typer.Option(1, help="refinement rounds (1: search once)"),
    wait: bool = typer.Option(False, "--wait", help="return once every job is finished"),
    timeout: float = option(QueueConfig, "wait_timeout_s", "--timeout"),
    key: str = typer.Option("", "--key", help="a name for this submission: submitting the same problems the same way "
                            "again adds nothing and prints the same job ids, unless under another key (to run them again)"),
    search_config: Optional[Path] = typer.Option(
        None, "--search-config", help="a JSON object of search settings (SearchConfig fields); flags override it"),
    strategy: Optional[str] = option(JOB_SEARCH, "strategy", unset=True),
    n: Optional[int] = option(JOB_SEARCH, "n", unset=True),
    temperature: Optional[float] = option(JOB_SEARCH, "temperature", unset=True),
    max_new_tokens: Optional[int] = option(JOB_SEARCH, "max_new_tokens", unset=True),
    beams: Optional[int] = option(JOB_SEARCH, "beams", unset=True),
    children: Optional[int] = option(JOB_SEARCH, "children", unset=True),
    simulations: Optional[int] = option(JOB_SEARCH, "simulations", unset=True),
    c_puct: Optional[float] = option(JOB_SEARCH, "c_puct", unset=True),
    scorer: Optional[str] = option(JOB_SEARCH, "scorer", unset=True),
    confidence: Optional[str] = option(JOB_SEARCH, "confidence", unset=True),
    use_verifier: Optional[bool] = option(JOB_SEARCH, "use_verifier", unset=True),
    length_penalty: Optional[float] = option(JOB_SEARCH, "length_penalty", unset=True),
    groups: Optional[int] = option(JOB_SEARCH, "groups", unset=True),
    diversity_penalty: Optional[float] = option(JOB_SEARCH, "diversity_penalty", unset=True),
    step_delimiter: Optional[str] = option(JOB_SEARCH, "step_delimiter", unset=True),
    max_step_tokens: Optional[int] = option(JOB_SEARCH, "max_step_tokens", unset=True),
    seed: Optional[int] = option(JOB_SEARCH, "seed", unset=True),
    memory: Optional[bool] = option(JOB_SEARCH, "memory", unset=True),
    task: Optional[str] = typer.Option(None, help="The task of lines that name none: built-in (addition, reversal), "
                                       "installed (arbor.tasks entry point) or module:Class (workers need it in ARBOR_TASKS)."),
):
    """Submit problems: they are stored, then one job per problem is queued (or run here without a broker)."""
    from tasks import allow, names
    from tasks.jsonl import read_problems
    from agent.jobs import submit_jobs, unsent

    flags = dict(strategy=strategy, n=n, temperature=temperature, max_new_tokens=max_new_tokens, beams=beams,
                 children=children, simulations=simulations, c_puct=c_puct, scorer=scorer, confidence=confidence,
                 use_verifier=use_verifier, length_penalty=length_penalty, groups=groups,
                 diversity_penalty=diversity_penalty, step_delimiter=step_delimiter, max_step_tokens=max_step_tokens,
                 seed=seed, memory=memory)
    if not file.is_file():
        _fail(f"{file} does not exist: pass a JSONL file of problems")
    if refine < 1:
        _fail(f"--refine must be at least 1 (got {refine})")
    given = read_search_config(search_config) if search_config is not None else {}
    given.update({k: v for k, v in flags.items() if v is not None})
    try:
        search = SearchConfig(**{**asdict(JOB_SEARCH), **given})
    except ValueError as exc:
        _fail(f"bad search configuration: {exc}")
    if task is not None:
        try:
            allow(task)
        except ValueError as exc:
            _fail(f"--task: {exc}")
    problems, errors = read_problems(file, known_tasks=names(), default_task=task)
    if errors:
        for e in errors:
            typer.echo(f"error: {e}", err=True)
        _fail(f"{len(errors)} bad line(s) in {file}; nothing was submitted: fix them and submit again")
    if not problems:
        _fail(f"{file} holds no problems")
    settings = _settings()
    if settings.broker_url:
        _check_broker(settings.broker_url)
    store = _store(settings)
    # the whole configuration, JSON-safe: run_job rebuilds it with SearchConfig(**params["search"])
    # one transaction, ids derived from the jobs: a submit killed part-way is run again and adds nothing twice
    job_ids = submit_jobs(store, problems, rounds=refine, search=asdict(search), key=key)
    for job_id in job_ids:  # the problems and jobs are committed: only now are the ids shown
        typer.echo(job_id)
    if settings.broker_url:
        pending = unsent(store, job_ids)  # a resubmit sends what is still queued; finished jobs stay finished
        _enqueue(pending, ["refine" if refine > 1 else "solve"] * len(pending))
        if wait:
            _wait(store, job_ids, timeout)
    else:
        _run_in_process(_settings(model=True), store, job_ids)
