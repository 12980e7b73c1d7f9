"""Celery tasks: a few lines each around the plain functions in agent/jobs.py, agent/train_cycle.py and agent/refine.py.

Messages carry only job ids (JSON): the problem, the search config and the rounds come from the store.
"""

from __future__ import annotations

import os
import socket

from celery import Task
from celery.signals import worker_process_init

from workers.app import app
from workers.config import QueueConfig

_state: dict = {}  # per pool child: settings, store, registry, policy cache, redis client


def _context() -> dict:
    """The child's settings, store, registry and policy cache, built once (after fork: engines never cross it)."""
    if not _state:
        import redis

        from agent.registry import PolicyRegistry
        from agent.settings import Settings
        from agent.store import Store
        from workers.cache import PolicyCache

        settings = Settings()
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        store = Store(settings.db_url)
        registry = PolicyRegistry(settings.policies_dir, store)
        cfg = QueueConfig.from_settings(settings)
        _state.update(settings=settings, store=store, registry=registry, cfg=cfg,
                      cache=PolicyCache(registry, settings.device, settings.dtype),
                      redis=redis.Redis.from_url(cfg.broker_url) if cfg.broker_url else None,
                      worker=f"{socket.gethostname()}:{os.getpid()}")
    return _state


@worker_process_init.connect
def _load_policy_once(**_):
    from agent.allocator import keep_freed_memory

    keep_freed_memory()  # a worker decodes all day: see the function for what it saves
    ctx = _context()
    if ctx["registry"].promoted() is not None:  # a fresh deployment may have none yet: the first job reports it
        ctx["cache"].get()


def _backoff(task: Task, base: int) -> int:
    return min(300, max(1, base) * 2 ** min(task.request.retries or 0, 8))


def _run(task: Task, job_id: str) -> dict:
    import redis

    from agent.jobs import LeaseBusy, ResultNotRecorded, run_job, store_unreachable
    from workers.lease import RedisLease
    from workers.recovery import lease_key

    ctx = _context()
    cfg = ctx["cfg"]
    lease = RedisLease(ctx["redis"], lease_key(job_id), cfg.lease_ttl) if ctx["redis"] else None

    def progress(r, this_round):
        task.update_state(state="PROGRESS", meta={"job_id": job_id, "round": r + 1,
                                                  "verified": this_round.best.verified,
                                                  "verdict": this_round.verdict.text})

    try:
        out = run_job(ctx["store"], job_id, ctx["cache"].get, ctx["worker"], lease=lease,
                      max_deliveries=cfg.max_deliveries, on_round=progress)
    except LeaseBusy as exc:
        # a second delivery while the first still runs: come back later; by then the job is finished (nothing to
        # do) or its holder died and the lease expired (take over)
        raise task.retry(exc=exc, countdown=max(1, cfg.lease_ttl // 3))
    except (ResultNotRecorded, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # the store or the broker stayed unreachable: this delivery must not end the job; it runs again later
        raise task.retry(exc=exc, countdown=_backoff(task, 5))
    except Exception as exc:
        if store_unreachable(exc):
            raise task.retry(exc=exc, countdown=_backoff(task, 5))
        raise
    _maybe_start_training(ctx)
    return out


def _maybe_start_training(ctx: dict) -> None:
    cfg = ctx["cfg"]
    if cfg.train_threshold <= 0 or ctx["redis"] is None:
        return
    if ctx["store"].count_trainable() < cfg.train_threshold:  # what a cycle would consume, so it resets
        return
    # one pending cycle at a time: the train cycle clears the flag when it starts
    if ctx["redis"].set("arbor:train-pending", ctx["worker"], nx=True, ex=cfg.visibility_timeout):
        train_cycle.apply_async(queue="train")


@app.task(name="arbor.solve", bind=True, max_retries=None)
def solve(self, job_id: str) -> dict:
    return _run(self, job_id)


@app.task(name="arbor.refine", bind=True, max_retries=None)
def refine(self, job_id: str) -> dict:
    return _run(self, job_id)


@app.task(name="arbor.train_cycle", bind=True, max_retries=None)
def train_cycle(self) -> dict:
    from agent.jobs import LeaseBusy
    from workers.lease import RedisLease
    from agent.train_cycle import run_train_cycle

    ctx = _context()
    if ctx["redis"] is not None:
        ctx["redis"].delete("arbor:train-pending")
        lock = RedisLease(ctx["redis"], "arbor:lock:train", ctx["cfg"].lease_ttl, holder=self.request.id)
    else:
        lock = None
    self.update_state(state="PROGRESS", meta={"stage": "training"})
    try:
        return run_train_cycle(ctx["settings"], ctx["store"], ctx["registry"], job_id=self.request.id,
                               worker=ctx["worker"], lock=lock, processes=ctx["settings"].train_processes)
    except LeaseBusy as exc:  # this very cycle is still running on another delivery
        raise self.retry(exc=exc, countdown=max(1, ctx["cfg"].lease_ttl // 3))
