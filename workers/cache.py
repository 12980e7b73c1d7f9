"""The policy a worker process holds: loaded once, reloaded between jobs when a newer version is promoted.

`get()` is called at the start of each job, never inside one, so a job runs start to finish on one version.
"""

from __future__ import annotations

import logging

log = logging.getLogger("arbor.workers")


class PolicyCache:
    def __init__(self, registry, device: str = "cpu", dtype: str = "float32"):
        self.registry = registry
        self.device = device
        self.dtype = dtype  # Settings.dtype (ARBOR_DTYPE)
        self.policy = None
        self.loads = 0

    def get(self):
        """The promoted policy, reloading first if the promoted version changed since the last job."""
        from agent.policy import PolicyLoadError

        current = self.registry.promoted()
        if current is None:
            raise PolicyLoadError("no promoted policy yet: run `arbor policies add PATH` or `arbor train` first")
        if self.policy is None or self.policy.version != current[0]:
            previous = self.policy.version if self.policy is not None else None
            self.policy = self.registry.load(current[0], device=self.device, dtype=self.dtype)
            self.loads += 1
            log.info("loaded policy %s (was %s) on %s as %s", current[0], previous, self.device, self.dtype)
        return self.policy
