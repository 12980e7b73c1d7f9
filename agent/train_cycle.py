"""A train cycle as a job: recorded in the store under its id, run under the train lock so that never two
run at once. Plain functions; `arbor train` calls them in process when no broker is configured."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent.store import ProblemRow, Store
from agent.jobs import FINISHED, LeaseBusy, record_once

log = logging.getLogger("arbor.workers")


def _ensure_job(store: Store, job_id: str) -> None:
    if store.get_job(job_id) is None:
        try:
            store.create_job("train", job_id=job_id)
        except IntegrityError:
            pass  # another delivery created it a moment ago


def loop_config_from_env():
    """The train cycle's LoopConfig, with the few knobs a deployment sets from the environment:
    ARBOR_TRAIN_BUDGET_S (fine-tune wall clock), ARBOR_PROMOTE_MARGIN (how much the candidate must beat the
    promoted version by on held-out problems), ARBOR_HELDOUT_PER_DIFFICULTY (built-in held-out set size)."""
    import os
    from dataclasses import replace

    from agent.loop import LoopConfig

    cfg = LoopConfig()
    if os.environ.get("ARBOR_TRAIN_BUDGET_S"):
        cfg.train = replace(cfg.train, time_budget_s=float(os.environ["ARBOR_TRAIN_BUDGET_S"]))
    if os.environ.get("ARBOR_PROMOTE_MARGIN"):
        cfg.promote_margin = float(os.environ["ARBOR_PROMOTE_MARGIN"])
    if os.environ.get("ARBOR_HELDOUT_PER_DIFFICULTY"):
        cfg.heldout_per_difficulty = int(os.environ["ARBOR_HELDOUT_PER_DIFFICULTY"])
    return cfg


def run_train_cycle(settings, store: Store, registry, job_id: str, worker: str, lock=None, cfg=None) -> dict:
    """Fine-tune the promoted policy on the store's new best trajectories, evaluate, promote or reject.

    `lock` is a RedisLease (with a broker) or a FileLease; a cycle that finds another cycle running is
    finished as skipped. A delivery of a finished cycle returns its stored result and trains nothing."""
    from agent.loop import train_from_store

    _ensure_job(store, job_id)
    job = store.get_job(job_id)
    if job.status in FINISHED:
        return job.result or {"error": job.error}
    lock = lock if lock is not None else FileLease(settings.home / "train.lock", holder=job_id)
    settings.home.mkdir(parents=True, exist_ok=True)
    if not lock.acquire():
        if lock.current_holder() == job_id:
            raise LeaseBusy(f"train cycle {job_id} is running elsewhere")
        result = {"skipped": "another train cycle is running"}
        record_once(store, job_id, result, [])
        return result
    try:
        if not store.start_job(job_id, worker):
            return store.get_job(job_id).result or {}
        try:
            if store.count_untrained_best() == 0:
                result = {"skipped": "no new best trajectories to train on"}
            else:
                result = train_from_store(settings, store, registry, cfg or loop_config_from_env())
        except Exception as exc:
            log.exception("train cycle %s failed", job_id)
            record_once(store, job_id, None, [], error=f"{type(exc).__name__}: {exc}")
            raise
        record_once(store, job_id, result, [])
        return result
    finally:
        lock.release()


def evaluate_version(store: Store, registry, version: str | None = None, device: str = "cpu") -> dict:
    """Accuracy of a version (default: the promoted one) on the store's held-out problems, by difficulty."""
    from agent.loop import evaluate_policy
    from search import SearchConfig

    policy = registry.load(version, device=device)
    with store.session() as s:
        heldout = [row.to_problem() for row in s.scalars(select(ProblemRow).where(ProblemRow.split == "heldout"))]
    by_difficulty: dict = {}
    for p in heldout:
        by_difficulty.setdefault(p.difficulty, []).append(p)
    return {"version": policy.version, "metrics": evaluate_policy(policy, by_difficulty, SearchConfig(strategy="greedy"))}


class FileLease:
    """An exclusive, non-blocking flock on a file: the in-process stand-in for the train lock (one host)."""

    def __init__(self, path, holder: str):
        self.path = path
        self.holder = holder
        self._fd = None

    def acquire(self) -> bool:
        import fcntl

        self._fd = open(self.path, "a+")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fd.close()
            self._fd = None
            return False
        return True

    def current_holder(self) -> str | None:
        return None

    def release(self) -> None:
        if self._fd is not None:
            self._fd.close()  # closing drops the flock
            self._fd = None
