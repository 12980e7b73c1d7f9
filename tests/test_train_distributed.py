"""A train cycle as two processes through `accelerate launch` on CPU (gloo): the fine-tune is data-parallel, the
first process alone gates and writes the version, and the result is the same kind of version a single-process
cycle writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import distributed
from agent.registry import PolicyRegistry
from agent.store import Store
from tasks import Problem
from tests.support import add_trajectories, tiny_promoted_policy

WORDS = ["cat", "dog", "owl", "elk", "ant", "bee", "emu", "yak"]


def _home(root: Path) -> dict:
    """A store with new search results and held-out problems of one user task, and a promoted built-in policy."""
    home = root / "home"
    home.mkdir(parents=True)
    store = Store(f"sqlite:///{home / 'arbor.db'}")
    registry = PolicyRegistry(home / "policies", store)
    tiny_promoted_policy(registry)
    store.add_problems([Problem(f"{w} backwards:", w[::-1], split="heldout", id=f"h-{w}") for w in WORDS[5:]])
    for w in WORDS[:5]:
        p = Problem(f"{w} backwards:", w[::-1], id=f"t-{w}")
        store.add_problems([p])
        store.create_job("solve", problem_id=p.id, job_id=f"j-{w}")
        add_trajectories(store, [dict(problem_id=p.id, job_id=f"j-{w}", cycle=None, round=0, completion=c, token_count=len(c),
                                     mean_logprob=-1.0 - i, min_logprob=-2.0 - i, mean_entropy=0.5, score=-1.0 - i,
                                     verified=c == p.answer, policy_version="v0", strategy="best_of_n", is_best=i == 0,
                                     search_stats={}) for i, c in enumerate([w[::-1], "zz"])])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBOR_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(ARBOR_HOME=str(home), ARBOR_DATABASE_URL=f"sqlite:///{home / 'arbor.db'}", ARBOR_DEVICE="cpu",
               ARBOR_TRAIN_BUDGET_S="4", ARBOR_PROMOTE_MARGIN="-1", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return {"home": home, "store": store, "env": env}


def _cycle(cmd: list[str], env: dict, timeout: float = 300) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _versions(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "policies").iterdir())


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_a_two_process_cycle_writes_one_version_the_single_process_cycle_would(tmp_path, adapter):
    launch = distributed.launch_command(2, ["train"])  # accelerate launch --multi_gpu --num_processes 2 -m arbor train
    single = [sys.executable, "-m", "arbor", "train"]
    outs = {}
    for name, cmd in (("two", launch), ("one", single)):
        home = _home(tmp_path / name)
        outs[name] = (_cycle(cmd, {**home["env"], "ARBOR_ADAPTER": adapter}), home)

    (two, home2), (one, home1) = outs["two"], outs["one"]
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1, (two["train"], one["train"])
    # the time budget ended the two-process fine-tune at one step on both ranks (a rank stopping alone would hang)
    assert two["train"]["steps"] >= 1 and one["train"]["steps"] >= 1
    for out, home in ((two, home2), (one, home1)):
        assert out["candidate"] == "v1" and out["promoted"] is True and out["task"] is None, out
        assert out["examples"] == 5
        assert _versions(home["home"]) == ["v0", "v1"]  # written once: no second folder, no leftover .tmp-*
        rows = {r.version: r.status for r in home["store"].policies()}
        assert sorted(rows) == ["v0", "v1"] and rows["v1"] == "promoted", rows
    # the same kind of version: the same files, loadable, recorded with the same parent and gate metrics
    files = {name: sorted(p.name for p in (h["home"] / "policies" / "v1").iterdir()) for name, (_, h) in outs.items()}
    assert files["two"] == files["one"], files
    # with LoRA both wrote the adapter alone (DDP averaged the adapter's gradients), over the same base
    assert ("adapter_model.safetensors" in files["one"]) == (adapter == "lora")
    assert ("model.safetensors" in files["one"]) == (adapter == "full")
    assert two["train"]["adapter"] == one["train"]["adapter"] == adapter
    assert set(two["metrics"]) == set(one["metrics"])
    registry = PolicyRegistry(home2["home"] / "policies", home2["store"])
    assert registry.load("v1").version == "v1"
    # and the store marked the results as consumed exactly as the single-process cycle did
    assert home2["store"].count_untrained_best() == home1["store"].count_untrained_best() == 0


def test_a_worker_set_to_two_train_processes_launches_the_cycle_and_returns_what_it_recorded(tmp_path, monkeypatch):
    from agent.settings import Settings
    from agent.train_cycle import run_train_cycle

    home = _home(tmp_path)
    for key, value in home["env"].items():
        monkeypatch.setenv(key, value)
    settings = Settings(home=home["home"], device="cpu")
    registry = PolicyRegistry(home["home"] / "policies", home["store"])
    out = run_train_cycle(settings, home["store"], registry, job_id="cycle-1", worker="trainer@test", processes=2)
    assert out["train"]["processes"] == 2 and out["candidate"] == "v1" and out["promoted"] is True, out
    job = home["store"].get_job("cycle-1")
    assert job.status == "done" and job.result == out
    assert _versions(home["home"]) == ["v0", "v1"]

    # a launch that cannot run the cycle fails the job with the cause in one line, not a silent success
    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.setenv("ARBOR_HOME", str(bare))
    monkeypatch.setenv("ARBOR_DATABASE_URL", f"sqlite:///{bare / 'arbor.db'}")
    store = Store(f"sqlite:///{bare / 'arbor.db'}")
    with pytest.raises(RuntimeError, match="2-process train cycle exited with status 1.*no promoted policy"):
        run_train_cycle(Settings(home=bare, device="cpu"), store, PolicyRegistry(bare / "policies", store),
                        job_id="cycle-2", worker="trainer@test", processes=2)
