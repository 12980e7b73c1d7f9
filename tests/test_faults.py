"""Faults with real parts: a PostgreSQL connection cut mid-job (a TCP proxy in front of the real server), a
running job whose worker died, and a worker SIGKILLed mid-job under the default visibility timeout (six hours):
nothing is lost, nothing stays stuck, every effect happens once."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis

from tasks import Problem
from tests.support import ArborProcess, RedisServer, deployment_stack, point_celery_app_at, seed_policy, wait_for, worker


class TcpProxy:
    """127.0.0.1:port -> target: `cut()` drops every connection and refuses new ones (a server restart as the
    client sees it), `restore()` serves again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self._serve()

    def _serve(self):
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not stop it
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns = []

    def restore(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self._serve()


@pytest.fixture()
def proxied_store(pg_url):
    from agent.store import Store

    host_part, name = pg_url.rsplit("/", 1)
    port = int(host_part.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    store = Store(f"{host_part.rsplit(':', 1)[0]}:{proxy.port}/{name}")
    yield store, proxy, Store(pg_url)
    store.engine.dispose()


def _job(store, pid):
    from agent.jobs import submit_jobs

    (job,) = submit_jobs(store, [Problem("12+34=", "640", id=pid)], search={"strategy": "best_of_n", "n": 3, "max_new_tokens": 4})
    return job


def test_a_result_write_during_a_database_restart_is_retried(proxied_store, tiny_policy):
    from agent.jobs import StoreRetry, run_job

    store, proxy, direct = proxied_store
    job = _job(store, "f1")

    def policy_then_restart():  # the database goes away while the job searches, and comes back 2 s later
        proxy.cut()
        threading.Timer(2.0, proxy.restore).start()
        return tiny_policy

    out = run_job(store, job, policy_then_restart, "w1", retry=StoreRetry(seconds=30, first_wait=0.2, max_wait=1))
    assert out["status"] == "done"
    assert direct.get_job(job).status == "done" and len(direct.trajectories(job_id=job)) == 3


def test_a_result_that_cannot_be_written_leaves_the_job_to_run_again(proxied_store, tiny_policy, tmp_path):
    from agent.jobs import ResultNotRecorded, StoreRetry, run_job
    from workers.lease import RedisLease

    store, proxy, direct = proxied_store
    job = _job(store, "f2")
    server = RedisServer(tmp_path, appendonly=False).start()
    try:
        client = redis.Redis(port=server.port)

        def policy_then_outage():
            proxy.cut()  # down for longer than the job retries
            return tiny_policy

        with pytest.raises(ResultNotRecorded):
            run_job(store, job, policy_then_outage, "w1", lease=RedisLease(client, f"lease:{job}", 5),
                    retry=StoreRetry(seconds=1, first_wait=0.1, max_wait=0.2))
        row = direct.get_job(job)
        assert row.status == "running" and row.result is None and not direct.trajectories(job_id=job)
        assert client.get(f"lease:{job}") is None  # the next delivery may take it at once
        proxy.restore()
        out = run_job(store, job, lambda: tiny_policy, "w2", lease=RedisLease(client, f"lease:{job}", 5))
        assert out["status"] == "done" and direct.get_job(job).attempts == 2
        assert len(direct.trajectories(job_id=job)) == 3
    finally:
        server.stop()


def test_requeue_sends_running_jobs_whose_worker_died(pg_url, tmp_path):
    from typer.testing import CliRunner

    from agent.store import Store
    from arbor.cli import app

    store = Store(pg_url)
    store.add_problems([Problem("1+1=", "20", id="q1"), Problem("2+2=", "40", id="q2"), Problem("3+3=", "60", id="q3")])
    dead, alive, waiting = (store.create_job("solve", problem_id=p) for p in ("q1", "q2", "q3"))
    store.start_job(dead, "gone:1")
    store.start_job(alive, "here:2")
    server = RedisServer(tmp_path, appendonly=False).start()
    try:
        client = redis.Redis(port=server.port)
        client.set(f"arbor:lease:{alive}", "here:2", ex=60)
        env = {"ARBOR_HOME": str(tmp_path / "home"), "ARBOR_DATABASE_URL": pg_url, "ARBOR_BROKER_URL": server.url}
        point_celery_app_at(server.url)
        res = CliRunner().invoke(app, ["requeue"], env=env)
        assert res.exit_code == 0, res.output
        assert "1 queued job(s) and 1 running job(s)" in res.output
        assert store.get_job(dead).status == "queued" and store.get_job(alive).status == "running"
        assert client.llen("search") == 2  # the waiting job and the dead worker's job; the live one is left alone
    finally:
        server.stop()
        store.engine.dispose()


def test_submit_wait_gives_up_by_default():
    import click
    import typer.main

    from arbor.cli import app

    group = typer.main.get_command(app)
    submit = group.get_command(click.Context(group), "submit")
    (timeout,) = [p for p in submit.params if p.name == "timeout"]
    assert timeout.default and 0 < float(timeout.default) <= 24 * 3600


SEARCH = {"strategy": "best_of_n", "n": 256, "max_new_tokens": 64}


@pytest.mark.slow
def test_a_killed_workers_job_finishes_within_two_minutes_exactly_once(tmp_path):
    """Default settings (visibility timeout six hours, lease TTL 60 s): the beat sends the job again."""
    with deployment_stack(tmp_path, seed_policy, appendonly=True, ARBOR_TRAIN_THRESHOLD=0) as dep:
        store = dep["store"]
        w1 = worker("w1", "search,default", dep["env"], tmp_path)
        dep["workers"].append(w1)
        beat = ArborProcess(["beat", "--loglevel", "INFO"], dep["env"], tmp_path / "beat.log").start()
        dep["workers"].append(beat)
        w1.wait_ready()
        ids = store.add_problems([Problem(f"{i}3+4{i}=", None, id=f"s{i}") for i in range(2)])
        jobs = [store.create_job("solve", problem_id=pid, params={"search": SEARCH}) for pid in ids]
        celery_app = point_celery_app_at(dep["redis"].url)
        for j in jobs:
            celery_app.send_task("arbor.solve", args=[j], task_id=j)
        wait_for(lambda: store.get_job(jobs[0]).status == "running", 60, "the first job to start", interval=0.05)
        w1.kill()  # a lost machine: parent and child
        killed_at = time.monotonic()
        w2 = worker("w2", "search,default", dep["env"], tmp_path)
        dep["workers"].append(w2)
        w2.wait_ready()
        wait_for(lambda: all(store.get_job(j).status == "done" for j in jobs), 170, "both jobs to finish", interval=0.5)
        elapsed = time.monotonic() - killed_at
        assert elapsed < 170, elapsed
        first = store.get_job(jobs[0])
        assert first.attempts >= 2
        for j in jobs:  # exactly once
            assert len(store.trajectories(job_id=j)) == SEARCH["n"]
            assert sum(t.is_best for t in store.trajectories(job_id=j)) == 1
        print(f"killed job finished {elapsed:.0f} s after the kill")


def test_a_stopped_worker_puts_its_running_job_back_at_once(tmp_path):
    """compose.yaml's stop: SIGTERM remapped to SIGQUIT (REMAP_SIGTERM). The worker gives its job
    ARBOR_SOFT_SHUTDOWN_S, then stops it and puts the message back at once: under the default six-hour visibility
    timeout, with no beat running, another worker finishes the job within seconds (warm shutdown instead waits
    for the job, and Docker's SIGKILL after the grace period leaves it to the visibility timeout)."""
    with deployment_stack(tmp_path, seed_policy, appendonly=True, ARBOR_TRAIN_THRESHOLD=0, ARBOR_LEASE_TTL=3,
                          REMAP_SIGTERM="SIGQUIT", ARBOR_SOFT_SHUTDOWN_S=2) as dep:
        store = dep["store"]
        w1 = worker("w1", "search,default", dep["env"], tmp_path)
        dep["workers"].append(w1)
        w1.wait_ready()
        (pid,) = store.add_problems([Problem("123+456=", None, id="stop1")])
        samples = 2048  # long enough to outlast the soft shutdown on an idle machine (512 have finished within it)
        job = store.create_job("solve", problem_id=pid, params={"search": {**SEARCH, "n": samples}})
        point_celery_app_at(dep["redis"].url).send_task("arbor.solve", args=[job], task_id=job)
        wait_for(lambda: store.get_job(job).status == "running", 60, "the job to start", interval=0.05)
        w1.proc.terminate()  # what `docker compose stop` sends to the container's first process
        stopped_at = time.monotonic()
        w1.proc.wait(timeout=30)
        assert time.monotonic() - stopped_at < 20 and store.get_job(job).status == "running"
        assert "Restoring 1 unacknowledged message(s)" in w1.text() or redis.Redis.from_url(dep["redis"].url).llen("search") == 1
        w2 = worker("w2", "search,default", dep["env"], tmp_path)
        dep["workers"].append(w2)
        w2.wait_ready()
        wait_for(lambda: store.get_job(job).status == "done", 120, "the job to finish on the second worker", interval=0.5)
        row = store.get_job(job)
        assert row.attempts == 2 and row.worker.endswith(f":{w2.children()[0]}")
        assert len(store.trajectories(job_id=job)) == samples


def test_a_train_cycle_whose_worker_died_is_sent_again(pg_url, tmp_path):
    """A running train job is alive while the train lock names it; one whose worker died mid-cycle (the lock
    expired, or another cycle holds it) is sent again under its own id."""
    from agent.store import Store
    from workers.recovery import TRAIN_LOCK, recover

    store = Store(pg_url)
    dead, alive = store.create_job("train", job_id="cycle-dead"), store.create_job("train", job_id="cycle-alive")
    store.start_job(dead, "gone:1")
    store.start_job(alive, "here:2")
    server = RedisServer(tmp_path, appendonly=False).start()
    try:
        client = redis.Redis(port=server.port)
        client.set(TRAIN_LOCK, alive, ex=60)
        sent = []
        assert recover(store, client, lambda job_id, kind: sent.append((job_id, kind)), grace_s=0) == [dead]
        assert sent == [(dead, "train")] and store.get_job(dead).status == "queued"
        assert store.get_job(alive).status == "running"
    finally:
        server.stop()
        store.engine.dispose()
