"""Leases: a job runs in one place at a time, and so does a train cycle.

`RedisLease` is `SET key holder NX EX ttl`, renewed by a daemon thread every ttl/3 while held, released only by
its holder (compare-and-delete in one Lua call). If the holder dies the key expires after ttl and another
delivery may take over.

The renewal keeps going through broker outages, and a key that vanished while the holder stalled (or that a
broker restart lost) is taken back if nobody else took it, in the same Lua call. Only a key held by another
holder ends the renewal: `lost` is set and an error logged (the store's write-once still keeps effects single).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

# 1: renewed, 2: the key had gone and is ours again, 0: another holder has it
_RENEW = """local v = redis.call('get', KEYS[1])
if v == ARGV[1] then redis.call('expire', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 2 end
return 0"""
_RELEASE = """if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"""

log = logging.getLogger("arbor.workers")


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RedisLease:
    def __init__(self, client, key: str, ttl: int, holder: str | None = None):
        self.client, self.key, self.ttl = client, key, ttl
        self.holder = holder or holder_name()
        self._stop = threading.Event()
        self.lost = threading.Event()  # set once another holder took the key: this holder no longer owns the work
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.holder, nx=True, ex=self.ttl):
            return False
        self._stop.clear()
        self.lost.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return True

    def current_holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                state = self.client.eval(_RENEW, 1, self.key, self.holder, self.ttl)
            except Exception:  # broker briefly down: try again next period
                continue
            if state == 2:
                log.warning("lease %s had expired (stall or broker restart); taken back by %s", self.key, self.holder)
            elif not state:
                self.lost.set()
                log.error("lease %s lost to %s: %s no longer holds it", self.key, self.current_holder(), self.holder)
                return

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
