"""Queue-facing commands: submit problems, follow jobs, read results, train, manage policy versions.

    arbor submit problems.jsonl [--refine 3] [--wait]   # job ids printed once the problems are in the store
                                                         # (arbor/commands/submit.py: the search configuration)
    arbor status [JOB]
    arbor results [--json]
    arbor train                                          # one train cycle (queued when a broker is configured)
    arbor policies [--json]
    arbor policies add ./my-model                        # a local transformers folder becomes the promoted version
    arbor requeue                                        # send again jobs still queued, and running jobs whose
                                                         # worker died (no live lease)

With ARBOR_BROKER_URL set, jobs go to Redis and `arbor worker` processes run them; without it, `submit` runs
them in this process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from arbor.cli import app
from arbor.options import load_settings

console = Console(stderr=True)


def _fail(message: str) -> None:
    from agent.settings import mask

    typer.echo(f"error: {mask(message)}", err=True)  # a URL's password is never printed
    raise typer.Exit(1)


def _settings(model: bool = False):
    """Settings from the environment. The device matters only where this process loads a model (model=True:
    ARBOR_DEVICE, default auto); "cpu" keeps torch out of the queue-only commands."""
    return load_settings() if model else load_settings(device="cpu")


def _store(settings):
    from agent.store import Store

    try:
        return Store(settings.db_url)
    except Exception as exc:
        _fail(f"cannot open the store at {settings.db_url}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
              "(check ARBOR_DATABASE_URL and that the database is running)")


def _check_broker(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:
        _fail(f"cannot reach the broker at {url} ({type(exc).__name__}): start Redis, or unset ARBOR_BROKER_URL "
              "to run jobs in this process; nothing was submitted")


def _enqueue(job_ids: list[str], kinds: list[str]) -> None:
    from workers.app import app as celery_app

    sent = 0
    try:
        for job_id, kind in zip(job_ids, kinds):
            # the job id is the task id: logs, task state and the store agree on one name
            celery_app.send_task(f"arbor.{kind}", args=[job_id], task_id=job_id)
            sent += 1
    except Exception as exc:
        _fail(f"{len(job_ids) - sent} of {len(job_ids)} jobs are in the store but not queued ({type(exc).__name__}: {exc}): "
              "run `arbor requeue` once the broker is back")


def _run_in_process(settings, store, job_ids: list[str]) -> None:
    from agent.registry import PolicyRegistry
    from workers.cache import PolicyCache
    from agent.jobs import run_job

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


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _wait(store, job_ids: list[str], timeout: float | None) -> None:
    start = time.monotonic()
    pending = set(job_ids)
    with _progress() as bar:
        task = bar.add_task("waiting for jobs", total=len(job_ids))
        while pending:
            done = {j for j in pending if store.get_job(j).status in ("done", "failed")}
            pending -= done
            bar.update(task, completed=len(job_ids) - len(pending))
            if pending and timeout and time.monotonic() - start > timeout:
                _fail(f"{len(pending)} jobs still unfinished after {timeout:.0f} s: see `arbor status` (are workers running?)")
            if pending:
                time.sleep(0.2)
    failed = [j for j in job_ids if store.get_job(j).status == "failed"]
    if failed:
        console.print(f"{len(failed)} of {len(job_ids)} jobs failed: see `arbor status {failed[0]}`")


@app.command()
def requeue():
    """Send again every job the store still marks queued (after a broker outage), and every running job whose lease
    expired (its worker died)."""
    import redis

    from workers.app import app as celery_app
    from workers.recovery import recover, send

    settings = _settings()
    if not settings.broker_url:
        _fail("no broker configured (ARBOR_BROKER_URL): there is no queue to send to")
    _check_broker(settings.broker_url)
    store = _store(settings)
    jobs = [j for j in store.list_jobs() if j.status == "queued" and j.kind in ("solve", "refine")]
    _enqueue([j.id for j in jobs], [j.kind for j in jobs])
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3, socket_timeout=10)
    stranded = recover(store, client, lambda job_id, kind: send(celery_app, job_id, kind), grace_s=0)
    typer.echo(f"requeued {len(jobs)} queued job(s) and {len(stranded)} running job(s) whose worker died")


@app.command()
def status(job: str = typer.Argument(None, help="a job id (default: a summary of all jobs)")):
    """Where jobs stand: counts by status, or one job in detail."""
    settings = _settings()
    store = _store(settings)
    if job is None:
        counts: dict = {}
        for row in store.list_jobs():
            counts.setdefault(row.kind, {}).setdefault(row.status, 0)
            counts[row.kind][row.status] += 1
        if not counts:
            typer.echo("no jobs yet: arbor submit FILE.jsonl")
        for kind, by_status in counts.items():
            typer.echo(f"{kind}: " + ", ".join(f"{s} {c}" for s, c in sorted(by_status.items())))
        return
    row = store.get_job(job)
    if row is None:
        _fail(f"no job {job!r} in the store: `arbor status` lists what there is")
    info = {"job_id": row.id, "kind": row.kind, "problem_id": row.problem_id, "status": row.status,
            "attempts": row.attempts, "rounds": row.rounds, "worker": row.worker, "result": row.result, "error": row.error}
    if settings.broker_url and row.status not in ("done", "failed"):
        from workers.app import app as celery_app

        res = celery_app.AsyncResult(row.id)
        info["task_state"] = res.state
        if isinstance(res.info, dict):
            info["progress"] = res.info
    typer.echo(json.dumps(info, indent=2, default=str))


@app.command()
def results(as_json: bool = typer.Option(False, "--json", help="print a JSON list")):
    """Every solve/refine job with its best attempt."""
    store = _store(_settings())
    out = []
    for row in store.list_jobs():
        if row.kind not in ("solve", "refine"):
            continue
        best = (row.result or {}).get("best")
        out.append({"job_id": row.id, "problem_id": row.problem_id, "status": row.status, "attempts": row.attempts,
                    "best": {k: best[k] for k in ("completion", "score", "verified")} if best else None})
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    for r in out:
        b = r["best"] or {}
        typer.echo(f"{r['job_id']}  {r['problem_id']}  {r['status']:7}  {b.get('verified')!s:5}  {b.get('completion', '')!r}")


@app.command()
def train(
    wait: bool = typer.Option(True, "--wait/--no-wait", help="with a broker: wait for the cycle's result"),
    timeout: float = typer.Option(None, help="with a broker: give up waiting after this many seconds"),
    here: bool = typer.Option(False, "--in-process", help="run the cycle in this process even when a broker is set "
                              "(implied under `accelerate launch` with several processes)"),
    job_id: str = typer.Option(None, "--job-id", help="record the cycle under this job id (default: a new one)"),
    lock_held: bool = typer.Option(False, "--lock-held", hidden=True, help="the caller holds the train lock"),
):
    """One train cycle: fine-tune on new best trajectories, evaluate against the promoted version, promote if better.

    Under `accelerate launch --multi_gpu --num_processes N -m arbor train` the fine-tune is data-parallel over the
    N processes; the first runs the cycle and writes the version, once."""
    from agent import distributed

    settings = _settings()
    if settings.broker_url and not here and not distributed.launched():
        _check_broker(settings.broker_url)
        from workers.app import app as celery_app

        res = celery_app.send_task("arbor.train_cycle", queue="train")
        typer.echo(res.id)
        if wait:
            with console.status("train cycle queued (a worker on the train queue runs it)"):
                try:
                    out = res.get(timeout=timeout, propagate=False)
                except Exception as exc:
                    _fail(f"no result for train cycle {res.id} ({type(exc).__name__}): see `arbor status {res.id}`")
            if res.failed():
                _fail(f"train cycle {res.id} failed: {out}")
            typer.echo(json.dumps(out, indent=2, default=str))
        return
    import uuid

    from agent.warm_start import ensure_policy
    from agent.registry import PolicyRegistry
    from agent.locks import HeldByCaller
    from agent.train_cycle import run_train_cycle

    settings = _settings(model=True)
    store = _store(settings)
    distributed.join(settings.device)
    if distributed.is_follower():
        registry = PolicyRegistry(settings.policies_dir, store)

        def parent(version: str):
            policy = registry.load(version, device=settings.device, dtype=settings.dtype)
            return policy.model, policy.tokenizer

        distributed.follow(parent)
        distributed.leave()
        return
    registry = PolicyRegistry(settings.policies_dir, store)
    if distributed.world_size() > 1 and registry.promoted() is None:
        distributed.end_cycle()  # the warm start is a single-process fine-tune: the other ranks could not join it
        distributed.leave()
        _fail("no promoted policy to train: run `arbor policies init` once, then launch the multi-process cycle")
    ensure_policy(settings, registry)
    worker = "in-process" if distributed.world_size() == 1 else f"{distributed.world_size()} processes"
    try:
        with console.status("training"):
            out = run_train_cycle(settings, store, registry, job_id=job_id or uuid.uuid4().hex, worker=worker,
                                  lock=HeldByCaller() if lock_held else None)
    finally:
        distributed.end_cycle()
        distributed.leave()
    typer.echo(json.dumps(out, indent=2, default=str))


policies_app = typer.Typer(help="Policy versions: list them, or register your own model.", no_args_is_help=False)
app.add_typer(policies_app, name="policies")


@policies_app.callback(invoke_without_command=True)
def policies(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print a JSON list")):
    """List policy versions (the promoted one marked)."""
    if ctx.invoked_subcommand is not None:
        return
    store = _store(_settings())
    rows = [{"version": r.version, "path": r.path, "status": r.status, "metrics": r.metrics} for r in store.policies()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo("no policy versions yet: `arbor policies add PATH` or `arbor run`")
    for r in rows:
        typer.echo(f"{'*' if r['status'] == 'promoted' else ' '} {r['version']:6} {r['status']:9} {r['path']}")


@policies_app.command("init")
def policies_init():
    """Create the store's schema and, when no version is promoted yet, warm-start the built-in policy as v0."""
    from agent.warm_start import ensure_policy
    from agent.registry import PolicyRegistry

    settings = _settings(model=True)
    store = _store(settings)
    registry = PolicyRegistry(settings.policies_dir, store)
    if registry.promoted() is None:
        with console.status("warm-starting the built-in policy"):
            ensure_policy(settings, registry)
    typer.echo(registry.promoted()[0])


@policies_app.command("add")
def policies_add(path: Path = typer.Argument(..., help="a local transformers model folder (save_pretrained)")):
    """Register a local model folder as a new version and promote it: workers move to it between jobs."""
    from agent.policy import PolicyLoadError
    from agent.registry import PolicyRegistry

    if not path.is_dir():
        _fail(f"{path} is not a folder: pass a directory written by save_pretrained (config.json, weights, tokenizer)")
    settings = _settings()
    store = _store(settings)
    try:
        version = PolicyRegistry(settings.policies_dir, store).add_external(path, promote=True)
    except PolicyLoadError as exc:
        _fail(f"{exc}; nothing was registered")
    typer.echo(version)
