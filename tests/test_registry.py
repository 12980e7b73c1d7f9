import multiprocessing
import os
import threading
import time

import pytest
import torch
from sqlalchemy.exc import IntegrityError

from agent.policy import build_builtin_policy
from agent.config import RegistryConfig
from agent.registry import PolicyRegistry
from agent.schema import PolicyVersionRow
from agent.store import Store


def _crash_in_child(tmp_path, where: str) -> None:
    """A save in another process that dies (os._exit: no cleanup runs) at `where`."""
    model, tok = build_builtin_policy()  # built here: the forked child only writes files

    def child():
        store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
        registry = PolicyRegistry(tmp_path / "policies", store)
        if where == "rename":
            import agent.registry

            agent.registry.os.rename = lambda *a: os._exit(3)
        else:
            store.finish_policy = lambda *a: os._exit(3)
        registry.save(model, tok, parent="v0", trained_on={})
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3


def test_crash_during_save_leaves_promoted_version_loadable(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy()
    v0 = registry.save(model, tok, parent=None, trained_on={"warm_start": True})
    registry.promote(v0, {"acc": 0.1})
    reference = registry.load().model.lm_head.weight.detach().clone()

    _crash_in_child(tmp_path, "rename")  # the process dies between the fsynced temp folder and the rename
    assert [p.name for p in (tmp_path / "policies").iterdir() if p.name.startswith(".tmp-")]  # the torn write

    restarted = PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))
    assert not [p for p in (tmp_path / "policies").iterdir() if p.name.startswith(".tmp-")]
    assert restarted.promoted()[0] == v0
    assert torch.equal(restarted.load().model.lm_head.weight, reference)
    assert [r.version for r in store.policies()] == [v0]
    assert restarted.save(model, tok, parent=v0, trained_on={}) == "v1"  # the number was never taken


def test_a_save_in_progress_elsewhere_is_not_removed(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy()
    started, resume = threading.Event(), threading.Event()
    real = tok.save_pretrained

    def slow_save(folder, *a, **k):  # the weights are written; the tokenizer comes later
        started.set()
        resume.wait(30)
        return real(folder, *a, **k)

    tok.save_pretrained = slow_save
    out = {}
    saver = threading.Thread(target=lambda: out.update(v=registry.save(model, tok, parent=None, trained_on={})))
    saver.start()
    started.wait(30)
    PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))  # another process starting
    resume.set()
    saver.join(60)
    assert out["v"] == "v0" and (tmp_path / "policies" / "v0" / "config.json").is_file()
    assert [r.status for r in store.policies()] == ["candidate"]


def test_a_crash_between_rename_and_record_is_adopted(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy()
    registry.promote(registry.save(model, tok, parent=None, trained_on={}), {})
    _crash_in_child(tmp_path, "record")
    assert {r.version: r.status for r in store.policies()} == {"v0": "promoted", "v1": "saving"}
    legacy = tmp_path / "policies" / "v7"  # a folder written by an older version that crashed before recording
    model.save_pretrained(legacy)
    tok.save_pretrained(legacy)
    (legacy / "arbor_meta.json").write_text('{"version": "v7", "parent": "v0", "trained_on": {"x": 1}, "metrics": {}}')
    restarted = PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))
    assert {r.version: r.status for r in store.policies()} == {"v0": "promoted", "v1": "candidate", "v7": "candidate"}
    assert restarted.load("v1").version == "v1"
    assert restarted.save(model, tok, parent="v0", trained_on={}) == "v8"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_saves_at_once_take_two_versions(tmp_path, request, backend):
    url = f"sqlite:///{tmp_path / 'arbor.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    registries = [PolicyRegistry(tmp_path / "policies", Store(url)) for _ in range(2)]
    model, tok = build_builtin_policy()
    both_written = threading.Barrier(2, timeout=20)
    import agent.registry

    real = agent.registry._fsync_tree

    def fsync_together(folder):  # both saves have picked their version and written their files
        both_written.wait()
        real(folder)

    out, errors = [], []

    def save(reg):
        try:
            out.append(reg.save(model, tok, parent=None, trained_on={}))
        except Exception as exc:
            errors.append(exc)
            both_written.abort()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("agent.registry._fsync_tree", fsync_together)
        threads = [threading.Thread(target=save, args=(r,)) for r in registries]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    assert not errors and sorted(out) == ["v0", "v1"]
    assert sorted(r.version for r in registries[0].store.policies()) == ["v0", "v1"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_only_one_version_is_ever_promoted(tmp_path, request, backend):
    url = f"sqlite:///{tmp_path / 'arbor.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = Store(url)
    for i in range(9):
        store.record_policy(f"v{i}", f"/x/v{i}", None, "candidate", {}, {})
    store.promote_policy("v0")
    with pytest.raises(IntegrityError):  # the database itself refuses a second promoted row
        with store.session() as s:
            s.get(PolicyVersionRow, "v1").status = "promoted"
    for round_ in range(4):  # promotions racing in 8 threads, each with its own connection
        stores = [Store(url) for _ in range(8)]
        go = threading.Barrier(8)
        errors = []

        def promote(st, v):
            try:
                go.wait(10)
                st.promote_policy(v)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=promote, args=(stores[i], f"v{i + 1}")) for i in range(8)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert not errors
        promoted = [r.version for r in store.policies() if r.status == "promoted"]
        assert len(promoted) == 1 and store.promoted_policy().version == promoted[0]
        for st in stores:
            st.engine.dispose()


def test_rejected_versions_lose_their_folders_after_the_retention_count(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store, RegistryConfig(keep_rejected=2))
    model, tok = build_builtin_policy()
    registry.promote(registry.save(model, tok, parent=None, trained_on={}), {})
    for _ in range(4):
        registry.reject(registry.save(model, tok, parent="v0", trained_on={}), {"acc": 0.0})
    on_disk = sorted(p.name for p in (tmp_path / "policies").iterdir())
    assert on_disk == ["v0", "v3", "v4"]
    rows = {r.version: r for r in store.policies()}
    assert [rows[v].status for v in ("v1", "v2", "v3", "v4")] == ["rejected"] * 4  # records kept
    assert rows["v1"].metrics["files_deleted"] and "files_deleted" not in rows["v3"].metrics
    assert rows["v0"].status == "promoted"


def test_versions_are_complete_folders_with_metadata(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy()
    v0 = registry.save(model, tok, parent=None, trained_on={"examples": 3}, metrics={"acc": 0.5})
    folder = tmp_path / "policies" / v0
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and (folder / "arbor_meta.json").is_file()
    assert not (folder / ".arbor_owner.json").exists()
    (row,) = store.policies()
    assert row.status == "candidate" and row.trained_on == {"examples": 3} and row.metrics == {"acc": 0.5}
