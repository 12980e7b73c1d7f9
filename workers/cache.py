"""The policy a worker process holds: loaded once, reloaded between jobs when a newer version is promoted.

`get()` is called at the start of each job, never inside one, so a job runs start to finish on one version. A new
version replaces the held one only once it has loaded; if a promoted version fails to load, the worker logs an
error and goes on with the version it holds (or, holding none, the version promoted before it), and tries the
broken one again after `retry_failed_s`.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("arbor.workers")


class PolicyCache:
    def __init__(self, registry, device: str = "cpu", dtype: str = "float32", retry_failed_s: float = 300.0):
        self.registry = registry
        self.device = device
        self.dtype = dtype  # Settings.dtype (ARBOR_DTYPE)
        self.retry_failed_s = retry_failed_s
        self.policy = None
        self.loads = 0
        self.failed: dict[str, float] = {}  # version -> when it last failed to load

    def _load(self, version: str):
        policy = self.registry.load(version, device=self.device, dtype=self.dtype)
        self.loads += 1
        return policy

    def get(self):
        """The promoted policy, reloading first if the promoted version changed since the last job."""
        from agent.policy import PolicyLoadError

        current = self.registry.promoted()
        if current is None:
            raise PolicyLoadError("no promoted policy yet: run `arbor policies add PATH` or `arbor train` first")
        version = current[0]
        if self.policy is not None and self.policy.version == version:
            return self.policy
        if time.monotonic() - self.failed.get(version, -1e18) < self.retry_failed_s and self.policy is not None:
            return self.policy  # known broken, retried later
        previous = self.policy.version if self.policy is not None else None
        try:
            policy = self._load(version)  # the held policy stays until this one has loaded
        except Exception as exc:
            self.failed[version] = time.monotonic()
            log.error("promoted policy %s failed to load (%s: %s); going on with %s", version, type(exc).__name__, exc,
                      previous or "the previously promoted version")
            if self.policy is not None:
                return self.policy
            self.policy = self._fallback(version, exc)
            return self.policy
        self.failed.pop(version, None)
        self.policy = policy
        log.info("loaded policy %s (was %s) on %s as %s; %d loads in this process", version, previous, self.device,
                 self.dtype, self.loads)
        return self.policy

    def _fallback(self, broken: str, exc: Exception):
        """Holding nothing: the most recently promoted earlier version that loads."""
        earlier = sorted((r for r in self.registry.store.policies() if r.status == "retired" and r.promoted_at is not None),
                         key=lambda r: r.promoted_at, reverse=True)
        for row in earlier:
            try:
                policy = self._load(row.version)
            except Exception:
                continue
            log.error("policy %s does not load: serving the previously promoted %s", broken, row.version)
            return policy
        raise exc
