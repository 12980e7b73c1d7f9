"""Jobs whose worker died are sent again within about two minutes, not after the visibility timeout (hours).

A running job holds a Redis lease (`arbor:lease:JOB`, workers/lease.py) that its worker renews every third of the
lease TTL, so a job marked `running` in the store with no live lease has a dead (or stalled for a whole TTL) worker.
`recover` finds such jobs, waits one more scan for the verdict to hold (`grace_s`), then sends the job again (a JSON
message with the job id only) and marks it queued with a compare-and-swap on (status, attempts), so a job that a
delivery started in the meantime is left alone. Effects stay exactly once: the store records a job's result once
(agent/jobs.py), and a second delivery of a running job waits on its lease.

A train cycle is recovered the same way: it runs under the train lock (`arbor:lock:train`, held by the cycle's
job id), so a train job marked `running` while the lock is free or held by another cycle died (SIGKILL mid-save:
the registry adopts or removes what its save left) and is sent again under the same id.

The beat process runs `recover` every QueueConfig.recover_every_s seconds in a thread (`arbor beat`: exactly one
per deployment; a Redis lock keeps two from scanning at once); `arbor requeue` runs it once with no grace.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("arbor.workers")

KINDS = ("solve", "refine", "train")
TRAIN_LOCK = "arbor:lock:train"  # the train cycle's lock (workers/tasks.py), its value the running cycle's job id


def lease_key(job_id: str) -> str:
    return f"arbor:lease:{job_id}"


def _mark_key(job_id: str) -> str:
    return f"arbor:leaseless:{job_id}"


def send(app, job_id: str, kind: str) -> None:
    # the job id is the task id: logs, task state and the store agree on one name
    if kind == "train":
        app.send_task("arbor.train_cycle", task_id=job_id)  # the cycle's job id is its task id
    else:
        app.send_task(f"arbor.{kind}", args=[job_id], task_id=job_id)


def stranded(store, client) -> tuple[list, list]:
    """(running jobs without a live lease, running jobs with one); a train cycle's lease is the train lock."""
    running = store.running_jobs(KINDS)
    if not running:
        return [], []
    pipe = client.pipeline(transaction=False)
    for job in running:
        pipe.get(TRAIN_LOCK) if job.kind == "train" else pipe.exists(lease_key(job.id))
    alive = [v == job.id.encode() if job.kind == "train" else bool(v) for job, v in zip(running, pipe.execute())]
    return [j for j, a in zip(running, alive) if not a], [j for j, a in zip(running, alive) if a]


def recover(store, client, send_job, grace_s: float) -> list[str]:
    """Send again every running job that has had no live lease for at least `grace_s` seconds (0: now).
    `send_job(job_id, kind)` puts its message on the queue. Returns the job ids sent."""
    now = time.time()
    dead, alive = stranded(store, client)
    if alive:
        client.delete(*[_mark_key(j.id) for j in alive])  # a lease came back: forget an earlier sighting
    sent = []
    for job in dead:
        if grace_s > 0:
            first = client.set(_mark_key(job.id), repr(now), nx=True, ex=max(60, int(grace_s * 4)))
            if first:
                continue
            seen = client.get(_mark_key(job.id))
            if seen is None or now - float(seen) < 0.9 * grace_s:  # one more scan (timer jitter)
                continue
        # send first: if the broker fails nothing changed and the next scan tries again; a message for a job that
        # a delivery started meanwhile finds it running (lease) or finished, and changes nothing
        send_job(job.id, job.kind)
        if store.requeue_running(job.id, job.attempts):
            log.warning("job %s was running on %s with no live lease: sent again (delivery %d died)",
                        job.id, job.worker, job.attempts)
        client.delete(_mark_key(job.id))
        sent.append(job.id)
    return sent


def start_in_beat(app, cfg) -> threading.Thread | None:
    """The beat's recovery thread: `recover` every cfg.recover_every_s seconds, one scanner at a time."""
    if cfg.recover_every_s <= 0 or not cfg.broker_url:
        return None

    def loop():
        import redis

        from agent.settings import Settings
        from agent.store import Store

        client = redis.Redis.from_url(cfg.broker_url, socket_timeout=10, socket_connect_timeout=10)
        store = None
        while True:
            try:
                store = store or Store(Settings(device="cpu").db_url)
                if client.set("arbor:recovery-scan", "1", nx=True, ex=max(1, cfg.recover_every_s - 1)):
                    sent = recover(store, client, lambda job_id, kind: send(app, job_id, kind), cfg.recover_every_s)
                    if sent:
                        log.warning("recovery: sent %d job(s) again: %s", len(sent), ", ".join(sent))
            except Exception:  # the store or the broker is down: try again next period
                log.exception("recovery scan failed")
            time.sleep(cfg.recover_every_s)

    thread = threading.Thread(target=loop, name="arbor-recovery", daemon=True)
    thread.start()
    log.info("recovery: running jobs without a live lease are sent again (scan every %d s)", cfg.recover_every_s)
    return thread
