"""`arbor submit` is atomic and idempotent: problems and jobs go into the store in one transaction (a crash part-way
stores nothing), job ids are derived from the jobs, so the same file submitted again adds no job and prints the same
ids, and a submit whose sending failed part-way is finished by submitting again."""

from __future__ import annotations

import json

import pytest
import redis
from sqlalchemy import event
from typer.testing import CliRunner

from tasks import Problem
from tests.support import RedisServer, point_celery_app_at, seed_policy


def _file(tmp_path, n=5):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}2+3{i}=", "answer": None}) + "\n" for i in range(n)))
    return path


def test_a_crash_while_storing_stores_nothing(tmp_path):
    from agent.jobs import submit_jobs
    from agent.schema import JobRow, ProblemRow
    from agent.store import Store

    store = Store(f"sqlite:///{tmp_path / 'a.db'}")

    def crash(conn, cursor, statement, *_):
        if statement.startswith("INSERT INTO jobs"):
            raise RuntimeError("killed while inserting jobs")

    event.listen(store.engine, "before_cursor_execute", crash)
    with pytest.raises(RuntimeError, match="killed"):
        submit_jobs(store, [Problem(f"{i}+1=", None) for i in range(4)], search={"max_new_tokens": 4})
    event.remove(store.engine, "before_cursor_execute", crash)
    with store.session() as s:
        assert s.query(ProblemRow).count() == 0 and s.query(JobRow).count() == 0


def test_submitting_the_same_file_again_adds_nothing(tmp_path):
    from agent.store import Store
    from arbor.cli import app

    home = tmp_path / "home"
    db = f"sqlite:///{home / 'arbor.db'}"
    seed_policy(home, db)
    env = {"ARBOR_HOME": str(home), "ARBOR_DATABASE_URL": db, "ARBOR_BROKER_URL": "", "ARBOR_DEVICE": "cpu"}
    path = _file(tmp_path)
    args = ["submit", str(path), "--strategy", "greedy", "--max-new-tokens", "4"]
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0 and again.stdout.split() == first.stdout.split()
    store = Store(db)
    jobs = store.list_jobs()
    assert len(jobs) == 5 and all(j.status == "done" and j.attempts == 1 for j in jobs)  # not run a second time
    other = CliRunner().invoke(app, [*args, "--key", "rerun-with-v2"], env=env)  # asked for: new jobs
    assert other.exit_code == 0 and not set(other.stdout.split()) & set(first.stdout.split())
    assert len(store.list_jobs()) == 10


def test_a_submit_whose_sending_failed_part_way_is_finished_by_submitting_again(tmp_path, monkeypatch):
    from agent.store import Store
    from arbor.cli import app

    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        db = f"sqlite:///{tmp_path / 'b.db'}"
        env = {"ARBOR_HOME": str(tmp_path / "home"), "ARBOR_DATABASE_URL": db, "ARBOR_BROKER_URL": server.url}
        celery_app = point_celery_app_at(server.url)
        real_send, sent = celery_app.send_task, []

        def send_two_then_die(name, args=None, task_id=None, **kw):
            if len(sent) == 2:
                raise ConnectionError("broker connection lost")
            sent.append(task_id)
            return real_send(name, args=args, task_id=task_id, **kw)

        monkeypatch.setattr(celery_app, "send_task", send_two_then_die)
        path = _file(tmp_path)
        broken = CliRunner().invoke(app, ["submit", str(path)], env=env)
        assert broken.exit_code == 1 and "3 of 5 jobs are in the store but not queued" in broken.output
        ids = broken.stdout.split()[:5]
        assert len(ids) == 5  # every id was printed before sending began
        monkeypatch.setattr(celery_app, "send_task", real_send)
        again = CliRunner().invoke(app, ["submit", str(path)], env=env)
        assert again.exit_code == 0 and again.stdout.split() == ids
        store = Store(db)
        assert len(store.list_jobs()) == 5  # no duplicates
        queued = [json.loads(m)["headers"]["id"] for m in redis.Redis.from_url(server.url).lrange("search", 0, -1)]
        assert set(queued) == set(ids)  # every job queued (the first two twice: a job sent twice runs once)
    finally:
        server.stop()
