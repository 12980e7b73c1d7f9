"""The Celery app. Importing it loads no model and no torch: the worker's parent process stays free of CUDA,
and each pool child loads the promoted policy in `worker_process_init` (workers/tasks.py).

    arbor worker --queues search --device cuda:0     # one per GPU (prefork, one child)
    arbor worker --queues train,default              # the trainer
    arbor beat                                        # exactly one per deployment
"""

from __future__ import annotations

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, beat_init

from workers.config import QueueConfig, celery_settings

app = Celery("arbor", include=["workers.tasks"])
app.conf.update(celery_settings(QueueConfig()))


@after_setup_logger.connect
@after_setup_task_logger.connect
def _mask_passwords(logger=None, **_):
    # the broker and database URLs carry passwords: no log line of a worker or the beat shows one
    from agent.settings import mask_logs

    mask_logs(logger)


@beat_init.connect
def _recover_in_beat(sender=None, **_):
    # the beat (exactly one per deployment) also sends again the jobs of workers that died (workers/recovery.py)
    from workers.recovery import start_in_beat

    start_in_beat(app, QueueConfig(broker_url=app.conf.broker_url))
