"""Running one job, with its effects recorded exactly once. No Celery here: `arbor submit` without a broker
calls these functions directly, and the Celery tasks in workers/tasks.py are thin wrappers over them.

A job's effects (its trajectories and its result) are written in one transaction that first flips the job
from unfinished to finished; a delivery that finds the job finished writes nothing. While a job runs it holds
a lease, so a second delivery of the same job does not search it a second time (see workers/lease.py).

Nothing is lost to a database blip: store reads and the result write are retried with backoff (StoreRetry); a result
that still cannot be written raises ResultNotRecorded, so that the delivery is not acknowledged as done and the job
runs again (the Celery task sends it again; a job left `running` without a live lease is sent again by the beat's
recovery, workers/recovery.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import exc as sa_exc
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from agent.schema import JOB_FINISHED, JobRow, check_rounds
from agent.store import Store
from tasks import Task, task_of


log = logging.getLogger("arbor.jobs")


class LeaseBusy(RuntimeError):
    """Another delivery of this job holds its lease and is running it now."""


class ResultNotRecorded(RuntimeError):
    """The store could not be written (after retries): the job must run again, its delivery must not count as done."""


def store_unreachable(exc: BaseException) -> bool:
    """A database error that a retry may cure (connection lost, server restarting), not a bug or a constraint."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


@dataclass
class StoreRetry:
    seconds: float = field(default=60.0, metadata={
        "help": "how long a job keeps retrying a store read or write that fails on a lost connection"})
    first_wait: float = field(default=0.5, metadata={"help": "first wait between retries, doubling each time"})
    max_wait: float = field(default=8.0, metadata={"help": "longest wait between retries"})

    def call(self, fn, *args, **kwargs):
        for attempt in Retrying(retry=retry_if_exception(store_unreachable), stop=stop_after_delay(self.seconds),
                                wait=wait_exponential(multiplier=self.first_wait, max=self.max_wait), reraise=True,
                                before_sleep=lambda state: log.warning("store unreachable (%s), retrying",
                                                                       state.outcome.exception())):
            with attempt:
                return fn(*args, **kwargs)


def submit_jobs(store: Store, problems: list, rounds: int = 1, search: dict | None = None, key: str = "") -> list[str]:
    """Put problems and one job per problem in the store, in one transaction; returns the job ids (only now may they
    be shown). Idempotent: the same problems submitted the same way (same rounds, search and `key`) are the same
    jobs, so a submit that crashed part-way is simply run again."""
    kind = "refine" if rounds > 1 else "solve"
    return store.submit(problems, kind, rounds, {"search": search or {}}, key)


def unsent(store: Store, job_ids: list[str]) -> list[str]:
    """The jobs of a submission that still need sending: those queued (a job that ran or runs is left alone; one
    sent twice runs once, its effects recorded once)."""
    status = store.job_status(job_ids)
    return [j for j in dict.fromkeys(job_ids) if status.get(j) == "queued"]


def out_of_memory(exc: BaseException) -> bool:
    """A device out-of-memory error (often transient: another process's memory, fragmentation)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _search_retrying(search: Callable, tries: int = 3):
    """Run a search, again (after freeing cached device memory, with backoff) when it ran out of device memory."""
    def free_cache(state):
        log.warning("search ran out of device memory (try %d of %d): retrying", state.attempt_number, tries)
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

    return Retrying(retry=retry_if_exception(out_of_memory), stop=stop_after_attempt(tries),
                    wait=wait_exponential(multiplier=1, max=10), before_sleep=free_cache, reraise=True)(search)


class ContextTooLong(ValueError):
    """The prompt and the completion asked for do not fit the model's context."""


def check_context(policy, prompt: str, max_new_tokens: int) -> None:
    """Refuse, with one clear line, a job whose prompt plus max_new_tokens exceeds the model's context (a model that
    states none is not checked)."""
    config = getattr(policy.model, "config", None)
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if isinstance(getattr(config, k, None), int)), None)
    if limit is None:
        return
    prompt_tokens = len(policy.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if prompt_tokens + max_new_tokens > limit:
        raise ContextTooLong(f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
                             f"{prompt_tokens + max_new_tokens} exceeds the model's context of {limit} tokens "
                             f"(policy {policy.version}): shorten the prompt or lower max_new_tokens")


def _record(retry: StoreRetry, store: Store, job_id: str, result: dict | None, rows: list[list[dict]],
            parents: list[int | None] | None = None, error: str | None = None) -> bool:
    """Store.finish_job, retried while the store is unreachable; ResultNotRecorded when it stays so."""
    try:
        return retry.call(store.finish_job, job_id, result, error, rows, parents)
    except Exception as exc:
        if store_unreachable(exc):
            raise ResultNotRecorded(f"job {job_id}: the result could not be written ({type(exc).__name__}); "
                                    "the job stays unfinished and runs again") from exc
        raise


def run_job(store: Store, job_id: str, get_policy: Callable, worker: str, lease=None, max_deliveries: int = 5,
            on_round: Callable | None = None, retry: StoreRetry | None = None) -> dict:
    """Run a solve or refine job once. Returns the job's result (the stored one when it was already finished).

    Raises LeaseBusy when another delivery holds the job's lease, ResultNotRecorded when the store stayed
    unreachable (the job is left unfinished) and a store error that retries did not cure: the caller runs the job
    again later; none of these may be acknowledged as the job's end."""
    from agent.evaluation import greedy_solver
    from agent.refine import best_of_rounds, refine, refine_rows, tried
    from search import SearchConfig

    retry = retry or StoreRetry()
    job = retry.call(store.get_job, job_id)
    if job is None:
        raise KeyError(f"no job {job_id!r} in the store: submit problems with `arbor submit FILE.jsonl`")
    if job.status in JOB_FINISHED:
        return _outcome(job)
    if lease is not None and not lease.acquire():
        raise LeaseBusy(f"job {job_id} is running elsewhere ({lease.current_holder()})")
    try:
        if not retry.call(store.start_job, job_id, worker):
            return _outcome(retry.call(store.get_job, job_id))
        job = retry.call(store.get_job, job_id)
        if job.attempts > max_deliveries:
            # a job that kills its worker every time (OOM) must not loop forever (requeue storms)
            _record(
                retry, store, job_id, None, [], error=f"gave up after {job.attempts - 1} deliveries that did not finish"
            )
            return _outcome(retry.call(store.get_job, job_id))
        problem = retry.call(store.get_problem, job.problem_id)
        try:
            cfg = SearchConfig(**(job.params or {}).get("search", {}))
            rounds = check_rounds(job.rounds) if job.kind == "refine" else 1
            policy = get_policy()  # between jobs: a newly promoted version is picked up here, never mid-search
            shown = cfg.prompt_format_for(policy).apply(policy.tokenizer, problem.prompt)  # what the model reads
            check_context(policy, shown, cfg.max_new_tokens)
            task = job_task(problem)
            solve = greedy_solver(policy, cfg) if task.label_checks() and problem.answer is None else None
            results = _search_retrying(lambda: refine(problem, policy, cfg, rounds, task, solve, on_round))
        except Exception as exc:
            if store_unreachable(exc):
                raise  # not the job's fault: it runs again
            log.exception("job %s failed", job_id)
            _record(retry, store, job_id, None, [], error=f"{type(exc).__name__}: {exc}")
            return _outcome(retry.call(store.get_job, job_id))
        best, at = best_of_rounds(results)
        result = {
            "problem_id": problem.id,
            "best": {"completion": best.completion, "score": best.score if best.score != float("-inf") else None,
                     "verified": best.verified, "round": at, "verdict": results[at].verdict.text},
            "rounds": len(results),
            "tried": tried(results),
            # what the job cost: each round's search (an adaptive one's stages and why each ran: in "tried")
            "spent": {"tokens": sum(r.result.generated_tokens for r in results),
                      "forward_passes": sum(r.result.forward_passes for r in results)},
            "stopped": stop_reason(results, rounds),
            "policy_version": results[0].result.policy_version,
            "worker": worker,
        }
        rows, parents = refine_rows(problem, results, job_id=job_id)
        if not _record(retry, store, job_id, result, rows, parents):
            log.warning("job %s was finished by another delivery; this run's results are dropped", job_id)
        return _outcome(retry.call(store.get_job, job_id))
    finally:
        if lease is not None:
            lease.release()


def job_task(problem) -> Task:
    """The task whose checks judge a job's attempts: the one the problem names, or the generic task (no checks)
    when this process does not know it; a job is never refused for its verdicts."""
    try:
        return task_of(problem)
    except ValueError:
        return Task()


def stop_reason(rounds: list, asked: int) -> str:
    """Why a job's rounds ended: an accepted attempt, the rounds asked for, or nothing new to try."""
    if rounds[-1].verdict.accepted is True:
        return "accepted"
    return "rounds" if len(rounds) == asked else "no new answer"


def _outcome(job: JobRow) -> dict:
    return {"job_id": job.id, "status": job.status, "result": job.result, "error": job.error}
