"""Running one job, with its effects recorded exactly once. No Celery here: `arbor submit` without a broker
calls these functions directly, and the Celery tasks in workers/tasks.py are thin wrappers over them.

A job's effects (its trajectories and its result) are written in one transaction that first flips the job
from unfinished to finished; a delivery that finds the job finished writes nothing. While a job runs it holds
a lease, so a second delivery of the same job does not search it a second time (see workers/lease.py).
"""

from __future__ import annotations

import logging
from typing import Callable

from sqlalchemy import update

from agent.store import JobRow, Store, TrajectoryRow, _now

log = logging.getLogger("arbor.workers")

FINISHED = ("done", "failed")


class LeaseBusy(RuntimeError):
    """Another delivery of this job holds its lease and is running it now."""


def submit_jobs(store: Store, problems: list, rounds: int = 1, search: dict | None = None) -> list[str]:
    """Put problems and one job per problem in the store; returns the job ids (only now may they be shown)."""
    ids = store.add_problems(problems)
    kind = "refine" if rounds > 1 else "solve"
    return [store.create_job(kind, problem_id=pid, rounds=rounds, params={"search": search or {}}) for pid in ids]


def record_once(store: Store, job_id: str, result: dict | None, rounds_rows: list[list[dict]],
                parents: list[int | None] | None = None, error: str | None = None) -> bool:
    """Finish the job and insert its trajectories in one transaction, only if it is not finished yet.

    `parents[r]` is the earlier round whose best row round r refined (its `parent_id`). Returns whether this call
    wrote anything."""
    with store.session() as s:
        changed = s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status.not_in(FINISHED))
            .values(status="failed" if error else "done", result=result, error=error, finished_at=_now())
        ).rowcount
        if changed != 1:
            return False
        best_ids = []
        for r, rows in enumerate(rounds_rows):
            parent = parents[r] if parents else None
            objs = [TrajectoryRow(**row, parent_id=None if parent is None else best_ids[parent]) for row in rows]
            s.add_all(objs)
            s.flush()  # assigns ids so that later rounds can point at this one
            best_ids.append(objs[0].id if objs else None)  # rows are ranked best first
    return True


def run_job(store: Store, job_id: str, get_policy: Callable, worker: str, lease=None, max_deliveries: int = 5,
            on_round: Callable | None = None) -> dict:
    """Run a solve or refine job once. Returns the job's result (the stored one when it was already finished).

    Raises LeaseBusy when another delivery holds the job's lease; the caller retries later."""
    from agent.refine import best_of_rounds, refine, refine_rows
    from search import SearchConfig

    job = store.get_job(job_id)
    if job is None:
        raise KeyError(f"no job {job_id!r} in the store: submit problems with `arbor submit FILE.jsonl`")
    if job.status in FINISHED:
        return _outcome(job)
    if lease is not None and not lease.acquire():
        raise LeaseBusy(f"job {job_id} is running elsewhere ({lease.current_holder()})")
    try:
        if not store.start_job(job_id, worker):
            return _outcome(store.get_job(job_id))
        job = store.get_job(job_id)
        if job.attempts > max_deliveries:
            # a job that kills its worker every time (OOM) must not loop forever (requeue storms)
            record_once(store, job_id, None, [], error=f"gave up after {job.attempts - 1} deliveries that did not finish")
            return _outcome(store.get_job(job_id))
        try:
            problem = store.get_problem(job.problem_id)
            cfg = SearchConfig(**(job.params or {}).get("search", {}))
            policy = get_policy()  # between jobs: a newly promoted version is picked up here, never mid-search
            results = refine(problem, policy, cfg, rounds=job.rounds if job.kind == "refine" else 1, on_round=on_round)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            record_once(store, job_id, None, [], error=f"{type(exc).__name__}: {exc}")
            return _outcome(store.get_job(job_id))
        best, at = best_of_rounds(results)
        result = {
            "problem_id": problem.id,
            "best": {"completion": best.completion, "score": best.score if best.score != float("-inf") else None,
                     "verified": best.verified, "round": at},
            "rounds": len(results),
            "policy_version": results[0].policy_version,
            "worker": worker,
        }
        rows, parents = refine_rows(problem, results, job_id=job_id)
        if not record_once(store, job_id, result, rows, parents):
            log.warning("job %s was finished by another delivery; this run's results are dropped", job_id)
        return _outcome(store.get_job(job_id))
    finally:
        if lease is not None:
            lease.release()


def _outcome(job: JobRow) -> dict:
    return {"job_id": job.id, "status": job.status, "result": job.result, "error": job.error}
