"""The train lock with a broker configured is the Redis lease the workers take (`arbor:lock:train`), also for
`arbor train --in-process`: a cycle held by a worker stops an in-process one. Real redis-server, real `arbor`."""

from __future__ import annotations

import json

import redis

from tests.support import RedisServer, arbor, arbor_env, seed_policy

LOCK = "arbor:lock:train"


def test_in_process_train_takes_the_workers_redis_lock(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        db_url = f"sqlite:///{tmp_path / 'arbor.db'}"
        seed_policy(tmp_path / "home", db_url)
        env = arbor_env(tmp_path / "home", db_url, server.url)
        client = redis.Redis.from_url(server.url)
        client.set(LOCK, "a-worker-cycle", ex=120)  # a worker's train cycle is running
        res = arbor("train", "--in-process", env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"skipped": "another train cycle is running"}
        assert client.get(LOCK) == b"a-worker-cycle"  # the worker's lock is left alone
        client.delete(LOCK)
        res = arbor("train", "--in-process", "--job-id", "cycle-here", env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"skipped": "no new best trajectories to train on"}
        assert client.get(LOCK) is None  # released
    finally:
        server.stop()
