"""The lease's renewal thread against a real redis-server: it renews, takes back a key that vanished while the
holder stalled or the broker restarted, keeps trying while the broker is down, and reports a key taken by
another holder."""

from __future__ import annotations

import time

import pytest
import redis

from tests.support import RedisServer, wait_for
from workers.lease import RedisLease


@pytest.fixture()
def server(tmp_path):
    s = RedisServer(tmp_path, appendonly=False).start()
    yield s
    s.stop()


def test_renewal_takes_back_a_vanished_key_and_survives_a_broker_restart(server):
    client = redis.Redis(port=server.port, socket_timeout=1, socket_connect_timeout=1)
    lease = RedisLease(client, "arbor:lease:j1", ttl=3, holder="me")
    assert lease.acquire()
    client.delete("arbor:lease:j1")  # expired while the process stalled
    wait_for(lambda: client.get("arbor:lease:j1") == b"me", 5, "the lease to be taken back")
    server.stop()  # a restart without persistence: the key is gone, and renewals fail meanwhile
    time.sleep(2.5)
    server.start()
    wait_for(lambda: client.get("arbor:lease:j1") == b"me", 5, "the lease after the broker restart")
    assert 0 < client.ttl("arbor:lease:j1") <= 3 and not lease.lost.is_set()
    lease.release()
    assert client.get("arbor:lease:j1") is None


def test_a_key_taken_by_another_holder_is_reported_lost_and_left_alone(server):
    client = redis.Redis(port=server.port)
    lease = RedisLease(client, "arbor:lease:j2", ttl=3, holder="me")
    assert lease.acquire()
    client.set("arbor:lease:j2", "other", ex=30)
    assert lease.lost.wait(5)
    time.sleep(1.2)
    assert client.get("arbor:lease:j2") == b"other"
    lease.release()  # compare-and-delete: the other holder keeps it
    assert client.get("arbor:lease:j2") == b"other"
