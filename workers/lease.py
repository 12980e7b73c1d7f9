"""Leases: a job runs in one place at a time, and so does a train cycle.

`RedisLease` is `SET key holder NX EX ttl`, renewed by a daemon thread every ttl/3 while held, released only by
its holder (compare-and-delete in one Lua call). If the holder dies the key expires after ttl and another
delivery may take over.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid

_RENEW = """if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"""
_RELEASE = """if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"""


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RedisLease:
    def __init__(self, client, key: str, ttl: int, holder: str | None = None):
        self.client, self.key, self.ttl = client, key, ttl
        self.holder = holder or holder_name()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.holder, nx=True, ex=self.ttl):
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return True

    def current_holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.holder, self.ttl):
                    return  # lost (expired while the process was stalled): the store's write-once still holds
            except Exception:  # broker briefly down: try again next period; the key lives ttl seconds
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.eval(_RELEASE, 1, self.key, self.holder)
        except Exception:
            pass  # the key expires by itself

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
