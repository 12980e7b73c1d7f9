"""The policy a worker process holds: loaded once, reloaded between jobs when a newer version is promoted.

`get()` is called at the start of each job, never inside one, so a job runs start to finish on one version. A new
version replaces the held one only once it has loaded; if a promoted version fails to load, the worker logs an
error and goes on with the version it holds (or, holding none, the version promoted before it), and tries the
broken one again after `retry_failed_s`.

LoRA adapter versions (agent/adapters.py) share one base: the first one loads it (`base_loads` counts that), and a
newly promoted adapter version over the same base loads only its adapter onto the held model and switches to it.
The model runs unmerged (the adapter's low-rank matmuls beside each frozen projection). Merged is faster: greedy
search of 120 problems x 10 tokens on the 1M-parameter built-in policy took 0.22-0.25 s merged against 0.32-0.35 s
unmerged (rank 16 on every projection; one CPU thread on a loaded 2-core machine), a worst case where the extra
small matmuls' overhead is most of the cost; a 0.5B-8B model's time goes to its large projections. Unmerged is kept:
merging writes the adapter into base weights that the versions over it share, so each switch would be an unmerge and
a merge in place (drifting in bf16, and half-done if a switch fails), or a second copy of the base, which is what
adapter versions are there to avoid on one GPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("arbor.workers")


class PolicyCache:
    def __init__(self, registry, device: str = "cpu", dtype: str = "float32", retry_failed_s: float = 300.0):
        self.registry = registry
        self.device = device
        self.dtype = dtype  # Settings.dtype (ARBOR_DTYPE)
        self.retry_failed_s = retry_failed_s
        self.policy = None
        self.loads = 0  # versions moved to, adapter switches included
        self.base_loads = 0  # bases of adapter versions read from disk by this cache
        self.base: str | None = None  # the held adapter version's base (sha256)
        self.failed: dict[str, float] = {}  # version -> when it last failed to load

    def _load(self, version: str):
        from agent.adapters import BASES, is_adapter, swap_adapter
        from agent.registry import load_value
        from agent.versions import folder_hash, read_base

        folder = self.registry.folder(version)
        base = read_base(folder)
        held = self.policy
        if base is not None and held is not None and is_adapter(held.model) and base["sha256"] == self.base:
            policy = swap_adapter(held, folder, version)  # the held base is the one this adapter trained over
            policy.value_model = load_value(self.registry, version, policy)  # the new version's judge, if it has one
        else:
            if (base is not None and held is not None and not is_adapter(held.model) and held.path is not None
                    and str(Path(held.path).resolve()) == base["path"] and folder_hash(held.path) == base["sha256"]):
                # the held full version is this adapter's base: go over it rather than load a second copy
                BASES.adopt(base["sha256"], self.device, self.dtype, held.model, held.tokenizer)
            before = BASES.loads
            policy = self.registry.load(version, device=self.device, dtype=self.dtype)
            self.base_loads += BASES.loads - before
        self.base = base["sha256"] if base is not None else None
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
        log.info("loaded policy %s (was %s) on %s as %s; %d loads in this process (%d of an adapter base)", version,
                 previous, self.device, self.dtype, self.loads, self.base_loads)
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
