"""The broker and the store behind passwords, with real parts: a redis-server with one ACL user (`arbor`, the default
user off) as compose.yaml runs it, a real `arbor worker` that authenticates with a password read from a file (a
Docker secret), an unauthenticated client refused; no password in any output or log line; the dead-letter list
capped."""

from __future__ import annotations

import json
from queue import Empty

import pytest
import redis

from tests.support import RedisServer, arbor, arbor_env, free_port, postgres_database, seed_policy, worker

REDIS_PASSWORD = "r3dis-Secret/with:odd@chars"
DB_PASSWORD = "pg-Secret-7d1f"  # the test server trusts local connections: the password only travels and must not show


def test_a_worker_authenticates_an_unauthenticated_client_is_refused_and_no_password_is_printed(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=False, password=REDIS_PASSWORD).start()
    w = None
    try:
        for client in (redis.Redis(port=server.port), redis.Redis(port=server.port, username="arbor", password="wrong")):
            with pytest.raises(redis.exceptions.AuthenticationError):
                client.ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=server.port).lpush("search", "forged")  # nobody without the password queues anything
        with postgres_database() as db_url:
            home = tmp_path / "home"
            seed_policy(home, db_url)
            secrets = tmp_path / "secrets"
            secrets.mkdir()
            (secrets / "redis_password").write_text(REDIS_PASSWORD + "\n")
            (secrets / "db_password").write_text(DB_PASSWORD + "\n")
            host, name = db_url.removeprefix("postgresql+psycopg://").split("@")[1].split("/")
            env = arbor_env(home, f"postgresql+psycopg://postgres@{host}/{name}", f"redis://arbor@127.0.0.1:{server.port}/0",
                            ARBOR_REDIS_PASSWORD_FILE=secrets / "redis_password",
                            ARBOR_DATABASE_PASSWORD_FILE=secrets / "db_password", ARBOR_TRAIN_THRESHOLD=0)
            w = worker("auth", "search,default", env, tmp_path)
            w.wait_ready()
            problems = tmp_path / "p.jsonl"
            problems.write_text(json.dumps({"prompt": "12+34=", "answer": "640", "id": "a1"}) + "\n")
            out = arbor("submit", str(problems), "--strategy", "greedy", "--max-new-tokens", "4", "--wait", env=env)
            assert out.returncode == 0, out.stderr
            status = arbor("status", out.stdout.split()[0], env=env)
            assert json.loads(status.stdout)["status"] == "done"

            # errors name the URL, never its password
            dead_db = {**env, "ARBOR_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"}
            dead_broker = {**env, "ARBOR_BROKER_URL": f"redis://arbor@127.0.0.1:{free_port()}/0"}
            failures = [arbor("status", env=dead_db), arbor("submit", str(problems), env=dead_broker)]
            assert [f.returncode for f in failures] == [1, 1]
            assert "cannot open the store at postgresql+psycopg://postgres:***@" in failures[0].stderr
            assert "cannot reach the broker at redis://arbor:***@" in failures[1].stderr
            w.stop()
            logs = [w.text(), out.stdout + out.stderr, status.stdout] + [f.stdout + f.stderr for f in failures]
            for text in logs:
                assert REDIS_PASSWORD not in text and DB_PASSWORD not in text
                assert "r3dis-Secret" not in text and "r3dis%2DSecret" not in text
            assert "arbor:***@" in w.text()  # Celery's banner names the broker, masked
    finally:
        if w is not None:
            w.stop()
        server.stop()


def test_the_dead_letter_list_keeps_only_the_newest_entries(tmp_path):
    from kombu import Connection

    server = RedisServer(tmp_path, appendonly=False).start()
    try:
        client = redis.Redis(port=server.port)
        for i in range(7):
            client.lpush("search", f"{{garbage {i}".encode())
        with Connection(server.url, transport="workers.transport:Transport", transport_options={"dead_letter_max": 3}) as conn:
            queue = conn.SimpleQueue("search")
            for _ in range(7):
                with pytest.raises(Empty):
                    queue.get(timeout=0.5)
        assert client.llen("search") == 0
        assert client.lrange("arbor:dead-letter", 0, -1) == [b"{garbage 6", b"{garbage 5", b"{garbage 4"]
    finally:
        server.stop()


def test_passwords_come_from_files_and_are_masked(tmp_path, monkeypatch, caplog):
    import logging

    from agent.settings import MaskPasswords, Settings, mask

    (tmp_path / "pw").write_text("p@ss word\n")
    monkeypatch.setenv("ARBOR_BROKER_URL", "redis://arbor@broker:6379/0")
    monkeypatch.setenv("ARBOR_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    url = Settings.env("broker_url")
    assert redis.connection.parse_url(url)["password"] == "p@ss word" and mask(url) == "redis://arbor:***@broker:6379/0"
    monkeypatch.setenv("ARBOR_REDIS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ARBOR_REDIS_PASSWORD_FILE"):
        Settings.env("broker_url")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "cannot reach %s", ("postgresql://u:hunter2@db/a",), None)
    try:
        raise RuntimeError("connect to rediss://:hunter2@broker:6380 failed")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    MaskPasswords().filter(record)
    assert "hunter2" not in record.getMessage() + record.exc_text and "u:***@db" in record.getMessage()
