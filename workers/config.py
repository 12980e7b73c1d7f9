"""Celery configuration for long GPU jobs (measured pitfalls and sources: shared/notes/celery-and-compose.md).

Every number comes from the environment so that tests can shrink the visibility timeout to seconds:

    ARBOR_BROKER_URL            redis://host:6379/0 (also the result backend, where task state and progress live)
    ARBOR_VISIBILITY_TIMEOUT    seconds a delivered, unacked message waits before Redis hands it out again (6 h)
    ARBOR_PROC_ALIVE_TIMEOUT    seconds a fresh pool child may take to load its model (300)
    ARBOR_LEASE_TTL             seconds a job's lease lives without renewal (60; renewed every third of it)
    ARBOR_MAX_DELIVERIES        deliveries after which a job is marked failed instead of run again (5)
    ARBOR_TRAIN_EVERY_S         beat period of the train cycle (3600)
    ARBOR_TRAIN_THRESHOLD       new best trajectories that start a train cycle (200; 0 turns it off)
    ARBOR_TORCH_THREADS         torch threads per worker process (unset: torch's default)
    ARBOR_TRAIN_BUDGET_S, ARBOR_PROMOTE_MARGIN, ARBOR_HELDOUT_PER_DIFFICULTY: the train cycle (workers/training.py)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer number of seconds/items") from None


@dataclass
class QueueConfig:
    broker_url: str | None = field(default_factory=lambda: os.environ.get("ARBOR_BROKER_URL") or None)
    visibility_timeout: int = field(default_factory=lambda: _env_int("ARBOR_VISIBILITY_TIMEOUT", 6 * 3600))
    proc_alive_timeout: int = field(default_factory=lambda: _env_int("ARBOR_PROC_ALIVE_TIMEOUT", 300))
    lease_ttl: int = field(default_factory=lambda: _env_int("ARBOR_LEASE_TTL", 60))
    max_deliveries: int = field(default_factory=lambda: _env_int("ARBOR_MAX_DELIVERIES", 5))
    train_every_s: int = field(default_factory=lambda: _env_int("ARBOR_TRAIN_EVERY_S", 3600))
    train_threshold: int = field(default_factory=lambda: _env_int("ARBOR_TRAIN_THRESHOLD", 200))

    def __post_init__(self):
        if self.visibility_timeout < 2:
            raise ValueError(f"ARBOR_VISIBILITY_TIMEOUT must be at least 2 s (got {self.visibility_timeout})")
        if self.lease_ttl < 3:
            raise ValueError(f"ARBOR_LEASE_TTL must be at least 3 s (got {self.lease_ttl})")

    @property
    def hard_time_limit(self) -> int:
        # below the visibility timeout, so a job is killed before Redis hands out a second copy
        return self.visibility_timeout - min(15 * 60, self.visibility_timeout // 4)

    @property
    def soft_time_limit(self) -> int:
        return self.hard_time_limit - min(15 * 60, self.hard_time_limit // 4)


QUEUES = ("search", "train", "default")

ROUTES = {
    "arbor.solve": {"queue": "search"},
    "arbor.refine": {"queue": "search"},
    "arbor.train_cycle": {"queue": "train"},
}


def celery_settings(cfg: QueueConfig) -> dict:
    vt = cfg.visibility_timeout
    transport = {
        "visibility_timeout": vt,
        # kombu sweeps unacked messages every interval x throttle seconds (10 x 10 by default): keep recovery of
        # a killed worker's job within about a quarter of the timeout when the timeout is short
        "unacked_restore_interval": max(1, min(10, vt // 4)),
        "unacked_restore_throttle": 1 if vt < 600 else 10,
    }
    return dict(
        broker_url=cfg.broker_url,
        # kombu's Redis transport, except that a malformed queue entry is set aside instead of killing the worker
        broker_transport="workers.transport:Transport",
        result_backend=cfg.broker_url,
        # JSON only: a message never carries code
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # at least once: a killed worker's job comes back; the store makes its effects happen once
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # the visibility timeout in all three places (celery#7651, #9339)
        visibility_timeout=vt,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": vt},
        task_time_limit=cfg.hard_time_limit,
        task_soft_time_limit=cfg.soft_time_limit,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_soft_shutdown_timeout=60,
        # a pool child loads the model in worker_process_init; the 4 s default would kill it in a loop
        worker_proc_alive_timeout=cfg.proc_alive_timeout,
        worker_max_tasks_per_child=None,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        task_default_queue="default",
        task_routes=ROUTES,
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
        beat_schedule={
            "train-cycle": {"task": "arbor.train_cycle", "schedule": float(cfg.train_every_s), "options": {"queue": "train"}},
        },
    )
