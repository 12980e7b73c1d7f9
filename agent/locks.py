"""Locks on one host: a run's lock (one process runs a run) and the in-process train lock."""

from __future__ import annotations


class FileLease:
    """An exclusive, non-blocking flock on a file: the in-process stand-in for the train lock (one host)."""

    def __init__(self, path, holder: str):
        self.path = path
        self.holder = holder
        self._fd = None

    def acquire(self) -> bool:
        import fcntl

        self._fd = open(self.path, "a+")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fd.close()
            self._fd = None
            return False
        return True

    def current_holder(self) -> str | None:
        return None

    def release(self) -> None:
        if self._fd is not None:
            self._fd.close()  # closing drops the flock
            self._fd = None


class HeldByCaller:
    """The train lock as seen by a cycle its caller runs under a lock it already holds (a worker's multi-process
    cycle): taking it again would find it busy."""

    def acquire(self) -> bool:
        return True

    def current_holder(self) -> str | None:
        return None

    def release(self) -> None:
        pass
