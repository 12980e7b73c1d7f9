"""Queue-facing commands: follow jobs, read results, send jobs again, train (submitting: arbor/commands/submit.py,
policy versions: arbor/commands/policies.py).

    arbor status [JOB]
    arbor results [--json]
    arbor train                                          # one train cycle (queued when a broker is configured)
    arbor requeue                                        # send again jobs still queued, and running jobs whose
                                                         # worker died (no live lease)

With ARBOR_BROKER_URL set, jobs go to Redis and `arbor worker` processes run them; without it, `submit` runs
them in this process.
"""

from __future__ import annotations

import json

import typer

from arbor.commands.common import check_broker, console, fail, open_store, queue_settings


def requeue():
    """Send again every job the store still marks queued (after a broker outage), and every running job whose lease
    expired (its worker died)."""
    import redis

    from arbor.submission import BrokerError, send_jobs
    from workers.app import app as celery_app
    from workers.recovery import recover, send

    settings = queue_settings()
    if not settings.broker_url:
        fail("no broker configured (ARBOR_BROKER_URL): there is no queue to send to")
    check_broker(settings.broker_url)
    store = open_store(settings)
    jobs = [j for j in store.list_jobs() if j.status == "queued" and j.kind in ("solve", "refine")]
    try:
        send_jobs([j.id for j in jobs], [j.kind for j in jobs])
    except BrokerError as exc:
        fail(str(exc))
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3, socket_timeout=10)
    stranded = recover(store, client, lambda job_id, kind: send(celery_app, job_id, kind), grace_s=0)
    typer.echo(f"requeued {len(jobs)} queued job(s) and {len(stranded)} running job(s) whose worker died")


def status(job: str = typer.Argument(None, help="a job id (default: a summary of all jobs)")):
    """Where jobs stand: counts by status, or one job in detail."""
    from agent.schema import JOB_FINISHED

    settings = queue_settings()
    store = open_store(settings)
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
        fail(f"no job {job!r} in the store: `arbor status` lists what there is")
    info = {"job_id": row.id, "kind": row.kind, "problem_id": row.problem_id, "status": row.status,
            "attempts": row.attempts, "rounds": row.rounds, "worker": row.worker, "result": row.result,
            "error": row.error}
    if settings.broker_url and row.status not in JOB_FINISHED:
        from workers.app import app as celery_app

        res = celery_app.AsyncResult(row.id)
        info["task_state"] = res.state
        if isinstance(res.info, dict):
            info["progress"] = res.info
    typer.echo(json.dumps(info, indent=2, default=str))


def results(as_json: bool = typer.Option(False, "--json", help="print a JSON list")):
    """Every solve/refine job with its best attempt."""
    store = open_store(queue_settings())
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
        typer.echo(f"{r['job_id']}  {r['problem_id']}  {r['status']:7}  {b.get('verified')!s:5}  "
                   f"{b.get('completion', '')!r}")


def _train_lock(settings, job_id: str):
    """With a broker, the workers' Redis train lock, so that a cycle here and a worker's never overlap; without
    one, None (run_train_cycle takes its file lock)."""
    if not settings.broker_url:
        return None
    import redis

    from workers.lease import RedisLease
    from workers.recovery import TRAIN_LOCK

    return RedisLease(redis.Redis.from_url(settings.broker_url), TRAIN_LOCK, settings.lease_ttl, holder=job_id)


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

    settings = queue_settings()
    if settings.broker_url and not here and not distributed.launched():
        check_broker(settings.broker_url)
        from arbor.submission import send_train_cycle

        res = send_train_cycle()
        typer.echo(res.id)
        if wait:
            with console.status("train cycle queued (a worker on the train queue runs it)"):
                try:
                    out = res.get(timeout=timeout, propagate=False)
                except Exception as exc:
                    fail(f"no result for train cycle {res.id} ({type(exc).__name__}): see `arbor status {res.id}`")
            if res.failed():
                fail(f"train cycle {res.id} failed: {out}")
            typer.echo(json.dumps(out, indent=2, default=str))
        return
    import uuid

    from agent.warm_start import ensure_policy
    from agent.registry import PolicyRegistry
    from agent.locks import HeldByCaller
    from agent.train_cycle import run_train_cycle

    settings = queue_settings(model=True)
    store = open_store(settings)
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
        fail("no promoted policy to train: run `arbor policies init` once, then launch the multi-process cycle")
    ensure_policy(settings, registry)
    worker = "in-process" if distributed.world_size() == 1 else f"{distributed.world_size()} processes"
    job_id = job_id or uuid.uuid4().hex
    try:
        with console.status("training"):
            out = run_train_cycle(settings, store, registry, job_id=job_id, worker=worker,
                                  lock=HeldByCaller() if lock_held else _train_lock(settings, job_id))
    finally:
        distributed.end_cycle()
        distributed.leave()
    typer.echo(json.dumps(out, indent=2, default=str))
