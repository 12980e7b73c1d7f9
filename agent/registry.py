"""Versioned policies: v0, v1, ... as complete save_pretrained folders with metadata.

A version is a complete folder or does not exist: written to a temporary folder, fsynced, renamed, and
only then recorded in the store. A crash anywhere before the rename leaves a `.tmp-*` folder that the
next registry start removes; the promoted version is never touched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from agent.policy import Policy, PolicyLoadError, load_policy
from agent.store import Store

META = "arbor_meta.json"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PolicyRegistry:
    def __init__(self, root: Path, store: Store):
        self.root = Path(root)
        self.store = store
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # an interrupted save: never recorded, never loaded

    def _next_version(self) -> str:
        taken = {p.name for p in self.root.iterdir()} | {r.version for r in self.store.policies()}
        numbers = [int(m.group(1)) for name in taken if (m := re.fullmatch(r"v(\d+)", name))]
        return f"v{max(numbers, default=-1) + 1}"

    def save(self, model, tokenizer, parent: str | None, trained_on: dict, metrics: dict | None = None,
             status: str = "candidate", draft_source=None) -> str:
        """Write a new version atomically and record it; returns its name. `draft_source` (a RecyclingMemory)
        is saved beside the weights, so a worker that loads the version starts with a warm matrix."""
        version = self._next_version()
        tmp = self.root / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if draft_source is not None:
            draft_source.save(tmp)
        meta = {"version": version, "parent": parent, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                "trained_on": trained_on, "metrics": metrics or {}}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _fsync_tree(tmp)
        final = self.root / version
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self.store.record_policy(version, str(final.resolve()), parent, status, trained_on, metrics or {})
        return version

    def add_external(self, path: str | Path, promote: bool = True) -> str:
        """Register a user's local transformers folder as a new version (copied, so the original may move)."""
        model, tokenizer = load_policy(path)  # fails with one clear line when the folder is not a model
        version = self.save(model, tokenizer, parent=None, trained_on={"source": str(Path(path).resolve())})
        if promote:
            self.promote(version, {})
        return version

    def promote(self, version: str, metrics: dict) -> None:
        self.store.set_policy_status(version, "promoted", metrics)

    def reject(self, version: str, metrics: dict) -> None:
        self.store.set_policy_status(version, "rejected", metrics)

    def promoted(self) -> tuple[str, str] | None:
        row = self.store.promoted_policy()
        return (row.version, row.path) if row else None

    def load(self, version: str | None = None, device: str = "cpu", dtype: str = "float32") -> Policy:
        """Load a version (default: the promoted one) on `device` with parameters in `dtype` (Settings.dtype)."""
        rows = {r.version: r for r in self.store.policies()}
        if version is None:
            current = self.promoted()
            if current is None:
                raise PolicyLoadError("no promoted policy yet: run `arbor run` or `arbor policies add PATH` first")
            version = current[0]
        if version not in rows:
            raise PolicyLoadError(f"unknown policy version {version!r}: see `arbor policies`")
        return Policy.load(rows[version].path, version=version, device=device, dtype=dtype)
