"""Celery configuration for long GPU jobs; each setting says which measured pitfall it avoids.

Every number is a setting (agent/settings.py reads ARBOR_BROKER_URL, ARBOR_VISIBILITY_TIMEOUT,
ARBOR_PROC_ALIVE_TIMEOUT, ARBOR_LEASE_TTL, ARBOR_MAX_DELIVERIES, ARBOR_TRAIN_EVERY_S, ARBOR_TRAIN_THRESHOLD), so that
tests can shrink the visibility timeout to seconds. Reading them here imports no torch: the Celery parent stays
free of CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from agent.settings import Settings


def _setting(name: str):
    """A QueueConfig field whose default, help and range are Settings' own (read from the environment)."""
    return field(default_factory=lambda: Settings.env(name), metadata=dict(Settings.__dataclass_fields__[name].metadata))


@dataclass
class QueueConfig:
    broker_url: str | None = _setting("broker_url")
    visibility_timeout: int = _setting("visibility_timeout")
    proc_alive_timeout: int = _setting("proc_alive_timeout")
    lease_ttl: int = _setting("lease_ttl")
    max_deliveries: int = _setting("max_deliveries")
    train_every_s: int = _setting("train_every_s")
    train_threshold: int = _setting("train_threshold")
    soft_shutdown_s: int = _setting("soft_shutdown_s")
    dead_letter_max: int = _setting("dead_letter_max")
    recover_every_s: int = field(default=30, metadata={
        "help": "seconds between the beat's scans for running jobs whose worker died (no live lease); such a job is "
                "sent again after two scans without a lease (0 turns it off: it waits out the visibility timeout)"})
    wait_timeout_s: float = field(default=3600.0, metadata={
        "help": "seconds `arbor submit --wait` waits for its jobs before giving up (0: no limit)"})

    def __post_init__(self):
        for f in fields(self):
            if f.name in Settings.__dataclass_fields__:
                Settings.check(f.name, getattr(self, f.name))  # e.g. "ARBOR_VISIBILITY_TIMEOUT must be at least 2 s"
        if self.recover_every_s < 0 or self.wait_timeout_s < 0:
            raise ValueError("recover_every_s and wait_timeout_s must be at least 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> "QueueConfig":
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls) if f.name in Settings.__dataclass_fields__})

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
        "dead_letter_max": cfg.dead_letter_max,  # read by workers/transport.py
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
        # a stopping worker (SIGTERM remapped to SIGQUIT, compose.yaml) lets its job run this long, then puts the
        # message back at once: a stop never leaves a job waiting out the visibility timeout
        worker_soft_shutdown_timeout=cfg.soft_shutdown_s,
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
