"""Versioned policies: v0, v1, ... as complete save_pretrained folders with metadata, or (a model fine-tuned with
LoRA) as its adapter and base.json naming the full folder it is over (agent/adapters.py).

A version is a complete folder or does not exist. Its number is taken first, by inserting its row (status
`saving`) into the store, so that two writers, in two processes or on two hosts, never take the same number.
The files are written to a temporary folder that names its owner (host and pid), fsynced, renamed to `vN`, and
only then does the row leave `saving`. At start, a registry tidies what crashed writers left:

- a `.tmp-*` folder whose owner is dead (same host) or that is older than STALE_S: removed (a save in progress in
  another process is left alone), with its `saving` row;
- a `saving` row whose folder `vN` is complete: the crash fell between the rename and the record; adopted as a
  candidate. A complete `vN` folder with no row at all is adopted too;
- rejected versions beyond the newest RegistryConfig.keep_rejected lose their folders (their records stay).

The promoted version is never touched, nor is the folder of a version that an adapter version is over.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

from agent.adapters import is_adapter, load_adapter_policy, save_adapter
from agent.config import RegistryConfig
from agent.policy import Policy, PolicyLoadError, load_policy
from agent.run_store import RunStore
from agent.store import Store
from agent.versions import folder_hash, read_base
from search.prompt_format import RAW, PromptFormat

log = logging.getLogger("arbor.registry")

META = "arbor_meta.json"
OWNER = ".arbor_owner.json"  # in a temporary folder: who is writing it
STALE_S = 3600.0  # a temporary folder this old is a crashed save, whoever wrote it


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(tmp: Path) -> dict:
    try:
        return json.loads((tmp / OWNER).read_text())
    except (OSError, ValueError):
        return {}


def _stale(tmp: Path) -> bool:
    """A temporary folder no live save is writing: its owner died on this host, or it is older than STALE_S."""
    try:
        age = time.time() - tmp.stat().st_mtime
    except FileNotFoundError:
        return False
    owner = _owner(tmp)
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
        return True
    return age > STALE_S


class PolicyRegistry:
    def __init__(self, root: Path, store: Store, cfg: RegistryConfig | None = None):
        self.root = Path(root)
        self.store = store
        self.cfg = cfg or RegistryConfig()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tidy()

    # crash recovery ------------------------------------------------------------------------------------------
    def tidy(self) -> None:
        """Remove what crashed saves left, adopt complete folders that were never recorded (see the module doc)."""
        in_progress, crashed = set(), set()
        for tmp in self.root.glob(".tmp-*"):
            version = _owner(tmp).get("version")
            if _stale(tmp):
                shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save: never recorded as done, never loaded
                crashed.add(version)
            elif version:
                in_progress.add(version)
        rows = {r.version: r for r in self.store.policies()}
        for version, row in rows.items():
            if row.status != "saving" or version in in_progress:
                continue
            if (self.root / version / META).is_file():
                self.store.finish_policy(version, "candidate")  # renamed, then the process died: the folder is whole
                log.warning(
                    "adopted policy %s: saved completely but never recorded (a crash after the rename)", version
                )
            elif not (self.root / version).exists() and (version in crashed or time.time() - _created(row) > STALE_S):
                self.store.drop_unsaved_policy(version)  # its writer is gone (its temp folder was removed): number free
        for folder in self.root.iterdir():
            if re.fullmatch(r"v\d+", folder.name) and folder.name not in rows and (folder / META).is_file():
                try:
                    meta = json.loads((folder / META).read_text())
                    self.store.record_policy(folder.name, str(folder.resolve()), meta.get("parent"), "candidate",
                                             meta.get("trained_on") or {}, meta.get("metrics") or {})
                    log.warning("adopted policy folder %s that had no record", folder.name)
                except (ValueError, OSError):
                    pass  # recorded by another process a moment ago, or unreadable: left as it is

    def save(self, model, tokenizer, parent: str | None, trained_on: dict, metrics: dict | None = None,
             status: str = "candidate", draft_source=None, prompt_format: PromptFormat = RAW) -> str:
        """Write a new version atomically and record it; returns its name. `draft_source` (a RecyclingMemory)
        is saved beside the weights, so a worker that loads the version starts with a warm matrix. A PeftModel (a
        LoRA fine-tune of `parent`) is saved as its adapter over the full folder beneath `parent`."""
        base = self._base_of(parent) if is_adapter(model) else None
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "version": None}
        (tmp / OWNER).write_text(json.dumps(owner))
        version = None
        try:
            floor = 1 + max((int(p.name[1:]) for p in self.root.iterdir() if re.fullmatch(r"v\d+", p.name)), default=-1)
            version = self.store.allocate_policy(lambda v: str((self.root / v).resolve()), parent, trained_on,
                                                 metrics or {}, floor=floor)
            (tmp / OWNER).write_text(json.dumps({**owner, "version": version}))
            if base is not None:
                save_adapter(model, tmp, *base)  # the base's tokenizer is the version's
            else:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            if draft_source is not None:
                draft_source.save(tmp)
            if not prompt_format.raw:
                prompt_format.save(tmp)
            meta = {"version": version, "parent": parent, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                    "trained_on": trained_on, "metrics": metrics or {}}
            (tmp / META).write_text(json.dumps(meta, indent=2))
            _fsync_tree(tmp)
            final = self.root / version
            os.rename(tmp, final)
            _fsync_dir(self.root)
            (final / OWNER).unlink(missing_ok=True)  # the folder is complete: nobody owns it any more
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if version is not None:
                try:
                    self.store.drop_unsaved_policy(version)
                except Exception:
                    log.exception("could not drop the record of unsaved policy %s", version)
            raise
        self.store.finish_policy(version, status)
        return version

    def _base_of(self, parent: str | None) -> tuple[str, str]:
        """(path, sha256) of the full folder an adapter trained from `parent` is over: `parent`'s own folder, or the
        base `parent` itself is over (as recorded then: those are the weights the adapter trained on)."""
        if parent is None:
            raise ValueError("a LoRA adapter needs the version it was trained from (parent) to be saved over")
        folder = self.folder(parent)
        recorded = read_base(folder)
        return (recorded["path"], recorded["sha256"]) if recorded else (str(folder.resolve()), folder_hash(folder))

    def bases(self) -> set[str]:
        """Resolved paths of the folders adapter versions are over."""
        found = set()
        for folder in self.root.iterdir():
            if re.fullmatch(r"v\d+", folder.name):
                try:
                    base = read_base(folder)
                except (OSError, ValueError):
                    continue
                if base is not None:
                    found.add(base["path"])
        return found

    def add_external(self, path: str | Path, promote: bool = True) -> str:
        """Register a user's local transformers folder as a new version (copied, so the original may move)."""
        model, tokenizer = load_policy(path)  # fails with one clear line when the folder is not a model
        version = self.save(model, tokenizer, parent=None, trained_on={"source": str(Path(path).resolve())})
        if promote:
            self.promote(version, {})
        return version

    def promote(self, version: str, metrics: dict) -> None:
        """Promote `version` whatever is promoted now (an operator's or a first version's promotion; a gate's goes
        through the compare-and-set on its parent, Store.promote_policy with `expected`)."""
        self.store.promote_policy(version, metrics=metrics)

    def reject(self, version: str, metrics: dict) -> None:
        self.store.set_policy_status(version, "rejected", metrics)
        self.prune_rejected()

    def prune_rejected(self) -> list[str]:
        """Delete the folders of rejected versions beyond the newest cfg.keep_rejected; their records stay (with
        `files_deleted` in their metrics). Returns the versions whose folders were deleted."""
        rejected = [
            r for r in self.store.policies() if r.status == "rejected" and not (r.metrics or {}).get("files_deleted")
        ]
        rejected.sort(key=lambda r: (_created(r), _number(r.version)))
        old = rejected[: max(0, len(rejected) - self.cfg.keep_rejected)]
        if old:
            bases = self.bases()
            old = [r for r in old if str(Path(r.path).resolve()) not in bases]  # adapters over it still load
        for row in old:
            shutil.rmtree(row.path, ignore_errors=True)
            shutil.rmtree(str(row.path) + VALUE_SUFFIX, ignore_errors=True)  # its value model goes with it
            self.store.set_policy_status(
                row.version, "rejected", {"files_deleted": dt.datetime.now(dt.timezone.utc).isoformat()}
            )
        return [r.version for r in old]

    def promoted(self) -> tuple[str, str] | None:
        row = self.store.promoted_policy()
        return (row.version, row.path) if row else None

    def folder(self, version: str) -> Path:
        """The folder of a saved version; PolicyLoadError (one line) for an unknown one or one still being saved."""
        row = next((r for r in self.store.policies() if r.version == version), None)
        if row is None:
            raise PolicyLoadError(f"unknown policy version {version!r}: see `arbor policies`")
        if row.status == "saving":
            raise PolicyLoadError(f"policy version {version!r} is still being saved")
        return Path(row.path)

    def load(self, version: str | None = None, device: str = "cpu", dtype: str = "float32") -> Policy:
        """Load a version (default: the promoted one) on `device` with parameters in `dtype` (Settings.dtype). An
        adapter version goes over its base, loaded once per process; a base whose files changed is refused."""
        if version is None:
            current = self.promoted()
            if current is None:
                raise PolicyLoadError("no promoted policy yet: run `arbor run` or `arbor policies add PATH` first")
            version = current[0]
        folder = self.folder(version)
        if read_base(folder) is not None:
            policy = load_adapter_policy(folder, version, device=device, dtype=dtype)
        else:
            policy = Policy.load(folder, version=version, device=device, dtype=dtype)
        policy.value_model = load_value(self, version, policy)  # the 'value' scorer's, when one was saved
        return policy

    def discard(self, version: str) -> None:
        """Delete a version that was never promoted or rejected (saved by a run killed before it recorded the
        cycle): its folder first, then its row, so that a kill in between leaves a folder that tidy() adopts and
        the next discard removes."""
        row = next((r for r in self.store.policies() if r.version == version), None)
        if row is not None and row.status not in ("saving", "candidate"):
            raise RuntimeError(f"policy version {version} is {row.status}: only an undecided version may be discarded")
        shutil.rmtree(self.root / version, ignore_errors=True)
        shutil.rmtree(self.root / (version + VALUE_SUFFIX), ignore_errors=True)
        RunStore(self.store).delete_undecided_policy(version)


# the value model beside a version ------------------------------------------------------------------------------
# A version's value model (agent/value.py) lives in `<version>.value/` next to the version's folder, not inside it:
# it is trained after the version is saved (and may be retrained), and a version's own files never change once
# written (an adapter version over it checks its base's hash).
VALUE_SUFFIX = ".value"


def value_folder(registry: PolicyRegistry, version: str) -> Path:
    folder = registry.folder(version)
    return folder.with_name(folder.name + VALUE_SUFFIX)


def save_value(registry: PolicyRegistry, version: str, value_model) -> Path:
    """Write `value_model` beside `version` atomically (a temporary folder renamed into place, replacing an older
    one); returns its folder."""
    target = value_folder(registry, version)
    tmp = registry.root / f".tmp-value-{uuid.uuid4().hex}"
    try:
        value_model.save(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = registry.root / f".tmp-value-old-{uuid.uuid4().hex}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(registry.root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_value(registry: PolicyRegistry, version: str, policy: Policy):
    """The value model saved beside `version`, over `policy` (that version, loaded), or None when it has none."""
    return load_value_beside(registry.folder(version), policy)


def load_value_beside(folder: str | Path, policy: Policy):
    """The value model saved beside a version's `folder` (as `arbor search --model FOLDER` names it), or None."""
    from agent.value import ValueModel

    folder = Path(folder)
    beside = folder.with_name(folder.name + VALUE_SUFFIX)
    return ValueModel.load(beside, policy) if beside.is_dir() else None


def _created(row) -> float:
    at = row.created_at
    if at is None:
        return 0.0
    if at.tzinfo is None:  # SQLite returns naive datetimes (stored in UTC)
        at = at.replace(tzinfo=dt.timezone.utc)
    return at.timestamp()


def _number(version: str) -> int:
    return int(version[1:]) if re.fullmatch(r"v\d+", version) else -1
