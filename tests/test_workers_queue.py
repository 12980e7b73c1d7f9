"""The queue with real parts: a redis-server started here (append-only file on), PostgreSQL, and real
`arbor worker` subprocesses (Celery prefork, one child each). The visibility timeout is a few seconds so that
redelivery after a crash shows up within the test.

The tests run in file order and share one Redis, one database and one ARBOR_HOME."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import uuid

import pytest
import redis

from tasks import Problem
from tests.support import arbor, deployment_stack, point_celery_app_at, seed_policy, wait_for, worker

VT = 6  # seconds: hard time limit 5 s, a killed worker's job comes back after about VT + 1 s
SEARCH = {"strategy": "best_of_n", "n": 8, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("queue")
    with deployment_stack(root, seed_policy, appendonly=True, ARBOR_VISIBILITY_TIMEOUT=VT, ARBOR_LEASE_TTL=3,
                          ARBOR_TRAIN_THRESHOLD=0) as state:
        yield state


def _start(deployment, name):
    w = worker(name, "search,default", deployment["env"], deployment["root"])
    deployment["workers"].append(w)
    return w


def _send(job_ids, broker_url):
    celery_app = point_celery_app_at(broker_url)
    for job_id in job_ids:
        celery_app.send_task("arbor.solve", args=[job_id], task_id=job_id)


def _wait_done(store, job_ids, timeout):
    def finished():
        return all(store.get_job(j).status in ("done", "failed") for j in job_ids)
    wait_for(finished, timeout, f"{len(job_ids)} jobs to finish", interval=0.3)


def _envelope(body: bytes, content_type: str, task: str = "arbor.solve") -> bytes:
    """A kombu Redis message as a producer would write it, with an arbitrary body and content type."""
    tag = uuid.uuid4().hex
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "binary" if "pickle" in content_type else "utf-8",
        "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": tag, "retries": 0, "argsrepr": "", "kwargsrepr": ""},
        "properties": {"correlation_id": tag, "delivery_mode": 2, "delivery_tag": tag, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "search"}, "priority": 0},
    }).encode()


def test_malformed_messages_and_unknown_tasks_are_refused_and_the_worker_keeps_serving(deployment):
    store = deployment["store"]
    w = _start(deployment, "w1").wait_ready()
    client = redis.Redis(port=deployment["redis"].port)
    client.lpush("search", b"{this is not a kombu message")
    client.lpush("search", _envelope(b"\x80\x04not pickled", "application/x-python-serialize"))  # never unpickled
    client.lpush("search", _envelope(b"[[\"oops\"", "application/json"))
    celery_app = point_celery_app_at(deployment["redis"].url)
    celery_app.send_task("arbor.no_such_task", args=["x"], queue="search")
    missing = celery_app.send_task("arbor.solve", args=["no-such-job"])
    (pid,) = store.add_problems([Problem("3+4=", "70", id="m1")])
    job = store.create_job("solve", problem_id=pid, params={"search": SEARCH})
    _send([job], deployment["redis"].url)
    _wait_done(store, [job], 60)
    assert store.get_job(job).status == "done"
    log = w.text()
    assert "Received unregistered task of type 'arbor.no_such_task'" in log
    assert "ContentDisallowed" in log or "Refusing to deserialize" in log
    assert "Can't decode message body" in log
    assert "no job 'no-such-job' in the store" in log
    assert missing.get(timeout=20, propagate=False).__class__ is KeyError
    assert w.proc.poll() is None  # still serving


def test_jobs_queued_across_a_redis_restart_are_not_lost(deployment, tmp_path):
    store, env, server = deployment["store"], deployment["env"], deployment["redis"]
    for w in deployment["workers"]:
        w.stop()
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"prompt": f"{i}1+2{i}=", "answer": "333", "id": f"r{i}"}) + "\n" for i in range(6)))
    out = arbor("submit", str(problems), "--strategy", "best_of_n", "--n", "8", "--max-new-tokens", "24", env=env)
    assert out.returncode == 0, out.stderr
    job_ids = out.stdout.split()
    assert len(job_ids) == 6 and all(store.get_job(j).status == "queued" for j in job_ids)
    assert redis.Redis(port=server.port).llen("search") == 6
    server.stop()
    down = arbor("submit", str(problems), env=env)  # while the broker is down: a clear line, nothing accepted
    assert down.returncode == 1 and "cannot reach the broker" in down.stderr and "Traceback" not in down.stderr
    server.start()
    assert redis.Redis(port=server.port).llen("search") == 6  # the append-only file kept the queue
    _start(deployment, "w2").wait_ready()
    _wait_done(store, job_ids, 90)
    assert all(store.get_job(j).status == "done" for j in job_ids)


def test_sigkill_mid_job_every_job_finishes_exactly_once(deployment):
    store = deployment["store"]
    w2 = deployment["workers"][-1]
    w3 = _start(deployment, "w3").wait_ready()
    problems = [Problem(f"{i:02d}+{i + 7:02d}=", None, id=f"k{i}") for i in range(20)]
    ids = store.add_problems(problems)
    job_ids = [store.create_job("solve", problem_id=pid, params={"search": SEARCH}) for pid in ids]
    _send(job_ids, deployment["redis"].url)
    host = socket.gethostname()

    def running_on(w):
        children = {f"{host}:{pid}" for pid in w.children()}
        jobs = [store.get_job(j) for j in job_ids]
        return [j.id for j in jobs if j.status == "running" and j.worker in children]

    def still_unfinished(jobs):  # a job that finished between the poll and the kill was not killed mid-job
        return [j for j in jobs if store.get_job(j).status != "done"]

    # a lost machine: the whole worker (parent and child) is SIGKILLed mid-job; its message waits out the VT
    seen = wait_for(lambda: running_on(w3), 60, "a job running on w3", interval=0.02)
    w3.kill()
    killed = still_unfinished(seen)
    # an OOM kill: only the pool child dies; Celery requeues its job at once and forks a fresh child. A job lasts
    # a fraction of a second and can finish between the poll and the kill, so the child is killed again (up to 5
    # times) until one kill lands mid-job
    for _ in range(5):
        seen = wait_for(lambda: running_on(w2), 60, "a job running on w2", interval=0.02)
        os.kill(w2.children()[0], signal.SIGKILL)
        caught = still_unfinished(seen)
        killed += caught
        if caught:
            break
    assert killed, "no job was caught mid-run by any kill"
    _wait_done(store, job_ids, 150)
    jobs = [store.get_job(j) for j in job_ids]
    assert [j.status for j in jobs] == ["done"] * 20
    for j in jobs:  # exactly once: one finished result and one set of candidates per job
        assert len(store.trajectories(job_id=j.id)) == SEARCH["n"]
        assert sum(t.is_best for t in store.trajectories(job_id=j.id)) == 1
    for j in killed:
        assert store.get_job(j).attempts >= 2, "the killed job was not delivered again"
    assert "WorkerLostError" in w2.text() or "Process 'ForkPoolWorker" in w2.text()
