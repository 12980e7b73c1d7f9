"""`arbor submit`: problems in, one job per problem, each carrying the whole validated search configuration.

    arbor submit problems.jsonl [--refine 3] [--wait]
    arbor submit problems.jsonl --search-config search.json                     # a JSON object of SearchConfig fields
    arbor submit problems.jsonl --search-config search.json --simulations 3     # a flag overrides the file
    arbor submit long.jsonl --memory     # every job through the context memory (without the flag: only the
                                         # problems longer than the policy's trained window, automatically)

The configuration is validated here (arbor/submission.py, as the HTTP API validates it) and stored whole in the
job's params, so that the worker (agent/jobs.py run_job) searches with exactly what was submitted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from arbor.commands.common import check_broker, console, fail, open_store, queue_settings
from arbor.options import option
from arbor.submission import JOB_SEARCH, SubmitError
from workers.config import QueueConfig


def read_search_config(path: Path) -> dict:
    """The SearchConfig fields in a JSON file, type-checked; any problem ends the command with one line."""
    from arbor.submission import check_search_fields

    if not path.is_file():
        fail(f"{path} does not exist: pass a JSON file holding an object of search settings (SearchConfig fields)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"{path} is not valid JSON: {exc}")
    if not isinstance(data, dict):
        fail(f"{path} must hold a JSON object of SearchConfig fields (got {type(data).__name__})")
    try:
        check_search_fields(data)
    except SubmitError as exc:
        fail(f"{path}: {exc}")
    return data


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _run_in_process(settings, store, job_ids: list[str]) -> None:
    from agent.jobs import run_job
    from agent.registry import PolicyRegistry
    from workers.cache import PolicyCache

    registry = PolicyRegistry(settings.policies_dir, store)
    if registry.promoted() is None:
        from agent.warm_start import ensure_policy

        console.print("no promoted policy yet: creating and warm-starting the built-in one")
        ensure_policy(settings, registry)
    cache = PolicyCache(registry, settings.device, settings.dtype)
    with _progress() as bar:
        task = bar.add_task("solving", total=len(job_ids))
        for job_id in job_ids:
            run_job(store, job_id, cache.get, worker="in-process")
            bar.advance(task)


def _wait(store, job_ids: list[str], timeout: float | None) -> None:
    from agent.schema import JOB_FINISHED

    start = time.monotonic()
    pending = set(job_ids)
    with _progress() as bar:
        task = bar.add_task("waiting for jobs", total=len(job_ids))
        while pending:
            pending -= {j for j in pending if store.get_job(j).status in JOB_FINISHED}
            bar.update(task, completed=len(job_ids) - len(pending))
            if pending and timeout and time.monotonic() - start > timeout:
                fail(f"{len(pending)} jobs still unfinished after {timeout:.0f} s: see `arbor status` "
                     "(are workers running?)")
            if pending:
                time.sleep(0.2)
    failed = [j for j in job_ids if store.get_job(j).status == "failed"]
    if failed:
        console.print(f"{len(failed)} of {len(job_ids)} jobs failed: see `arbor status {failed[0]}`")


def submit(
    file: Path = typer.Argument(..., help="problems, one JSON object a line"),
    refine: int = typer.Option(1, help="refinement rounds (1: search once)"),
    wait: bool = typer.Option(False, "--wait", help="return once every job is finished"),
    timeout: float = option(QueueConfig, "wait_timeout_s", "--timeout"),
    key: str = typer.Option("", "--key", help="a name for this submission: submitting the same problems the same way "
                            "again adds nothing and prints the same job ids, unless under another key (to run them "
                            "again)"),
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
    accept_score: Optional[float] = option(JOB_SEARCH, "accept_score", unset=True),
    confidence: Optional[str] = option(JOB_SEARCH, "confidence", unset=True),
    use_verifier: Optional[bool] = option(JOB_SEARCH, "use_verifier", unset=True),
    length_penalty: Optional[float] = option(JOB_SEARCH, "length_penalty", unset=True),
    groups: Optional[int] = option(JOB_SEARCH, "groups", unset=True),
    diversity_penalty: Optional[float] = option(JOB_SEARCH, "diversity_penalty", unset=True),
    step_delimiter: Optional[str] = option(JOB_SEARCH, "step_delimiter", unset=True),
    max_step_tokens: Optional[int] = option(JOB_SEARCH, "max_step_tokens", unset=True),
    seed: Optional[int] = option(JOB_SEARCH, "seed", unset=True),
    memory: Optional[bool] = option(JOB_SEARCH, "memory", unset=True),
    prompt_format: Optional[str] = option(JOB_SEARCH, "prompt_format", unset=True),
    system_prompt: Optional[str] = option(JOB_SEARCH, "system_prompt", unset=True),
    task: Optional[str] = typer.Option(None, help="The task of lines that name none: built-in (addition, reversal), "
                                       "installed (arbor.tasks entry point) or module:Class (workers need it in "
                                       "ARBOR_TASKS)."),
):
    """Submit problems: they are stored, then one job per problem is queued (or run here without a broker)."""
    from agent.jobs import submit_jobs
    from arbor.submission import BrokerError, job_search, queue_submitted, read_problem_file
    from tasks import allow

    flags = dict(strategy=strategy, n=n, temperature=temperature, max_new_tokens=max_new_tokens, beams=beams,
                 children=children, simulations=simulations, c_puct=c_puct, scorer=scorer,
                 accept_score=accept_score, confidence=confidence,
                 use_verifier=use_verifier, length_penalty=length_penalty, groups=groups,
                 diversity_penalty=diversity_penalty, step_delimiter=step_delimiter, max_step_tokens=max_step_tokens,
                 seed=seed, memory=memory, prompt_format=prompt_format, system_prompt=system_prompt)
    if not file.is_file():
        fail(f"{file} does not exist: pass a JSONL file of problems")
    if refine < 1:
        fail(f"--refine must be at least 1 (got {refine})")
    given = read_search_config(search_config) if search_config is not None else {}
    given.update({k: v for k, v in flags.items() if v is not None})
    try:
        search = job_search(given)
    except SubmitError as exc:
        fail(str(exc))
    if task is not None:
        try:
            allow(task)
        except ValueError as exc:
            fail(f"--task: {exc}")
    try:
        problems = read_problem_file(file, default_task=task)
    except SubmitError as exc:
        for e in exc.errors or []:
            typer.echo(f"error: {e}", err=True)
        fail(str(exc))
    settings = queue_settings()
    if settings.broker_url:
        check_broker(settings.broker_url)
    store = open_store(settings)
    # one transaction, ids derived from the jobs: a submit killed part-way is run again and adds nothing twice
    job_ids = submit_jobs(store, problems, rounds=refine, search=search, key=key)
    for job_id in job_ids:  # the problems and jobs are committed: only now are the ids shown
        typer.echo(job_id)
    if settings.broker_url:
        try:
            queue_submitted(store, job_ids, refine)  # a resubmit sends what is still queued; finished jobs stay so
        except BrokerError as exc:
            fail(str(exc))
        if wait:
            _wait(store, job_ids, timeout)
    else:
        _run_in_process(queue_settings(model=True), store, job_ids)
