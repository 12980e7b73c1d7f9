import pytest
import torch

from agent.policy import build_builtin_policy
from agent.registry import PolicyRegistry
from agent.store import Store


def test_crash_during_save_leaves_promoted_version_loadable(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy()
    v0 = registry.save(model, tok, parent=None, trained_on={"warm_start": True})
    registry.promote(v0, {"acc": 0.1})
    reference = registry.load().model.lm_head.weight.detach().clone()

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    def crash(*args):  # the process dies between the fsynced temp folder and the rename
        raise RuntimeError("simulated crash before the rename")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("agent.registry.os.rename", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            registry.save(model, tok, parent=v0, trained_on={})
    assert [p.name for p in (tmp_path / "policies").iterdir() if p.name.startswith(".tmp-")]  # the torn write

    restarted = PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))
    assert not [p for p in (tmp_path / "policies").iterdir() if p.name.startswith(".tmp-")]
    assert restarted.promoted()[0] == v0
    assert torch.equal(restarted.load().model.lm_head.weight, reference)
    assert [r.version for r in store.policies()] == [v0]
    assert restarted.save(model, tok, parent=v0, trained_on={}) == "v1"  # the number was never taken


def test_versions_are_complete_folders_with_metadata(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    model, tok = build_builtin_policy()
    v0 = registry.save(model, tok, parent=None, trained_on={"examples": 3}, metrics={"acc": 0.5})
    folder = tmp_path / "policies" / v0
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and (folder / "arbor_meta.json").is_file()
    (row,) = store.policies()
    assert row.status == "candidate" and row.trained_on == {"examples": 3} and row.metrics == {"acc": 0.5}
