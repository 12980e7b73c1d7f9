"""The `cpu` and `gpu` compose layouts as real processes: each worker service's command, as compose.yaml renders
it, runs here (with `--device cpu` where the layout names cuda: the one fake, for the GPU), beside a real
redis-server and PostgreSQL database. Through the `cli` service's commands: a batch of a user's problems is
submitted and solved, a train cycle refuses while the store holds no held-out problems of that task, promotes
once it does, and the workers' next job uses the promoted version without a restart.

The policy is the untrained built-in one and the fine-tune lasts 2 s, so ARBOR_PROMOTE_MARGIN=-1 lets the
candidate through: the promotion rule itself is tested with the loop."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from agent.registry import PolicyRegistry
from tests.support import ArborProcess, arbor, deployment_stack, seed_policy
from tests.test_compose import ROOT, _binary

WORDS = ["cat", "dog", "owl", "elk", "ant", "bee", "emu", "yak", "gnu", "cow"]


def _services(*profiles: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBOR_", "POSTGRES_", "COMPOSE_", "REDIS_"))}
    chosen = [a for p in profiles for a in ("--profile", p)]
    out = subprocess.run([str(_binary()), "-f", str(ROOT / "compose.yaml"), "--project-directory", str(ROOT), *chosen,
                          "config", "--format", "json"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _train(env) -> dict:
    out = arbor("train", "--timeout", "240", env=env, timeout=260)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout[out.stdout.index("{"):])


@pytest.mark.parametrize("layout", ["cpu", "gpu"])
def test_layout_submits_refuses_without_heldout_then_promotes_and_reloads(layout, tmp_path):
    services = _services(layout, "cli")
    workers = {n: s["command"][1:] for n, s in services.items() if (s.get("command") or [""])[:2] == ["arbor", "worker"]}
    assert workers and "cli" in services
    commands = [["cpu" if a == "cuda" else a for a in cmd] for cmd in workers.values()]
    queues = {q for cmd in commands for q in cmd[cmd.index("--queues") + 1].split(",")}
    assert {"search", "train"} <= queues, workers  # the layout serves both

    with deployment_stack(tmp_path, seed_policy, appendonly=True, ARBOR_TRAIN_THRESHOLD=0, ARBOR_TRAIN_BUDGET_S=2,
                          ARBOR_PROMOTE_MARGIN=-1, ARBOR_LEASE_TTL=10) as stack:
        env, store = stack["env"], stack["store"]
        for name, cmd in zip(workers, commands):
            stack["workers"].append(ArborProcess(cmd + ["--loglevel", "INFO"], env, tmp_path / f"{name}.log").start())
        for p in stack["workers"]:
            p.wait_ready()
        registry = PolicyRegistry(tmp_path / "home" / "policies", store)
        search = ["--strategy", "greedy", "--max-new-tokens", "6", "--wait", "--timeout", "180"]

        # a user's task (no task name, answers on held-out problems only): the batch through the cli's submit
        batch = _jsonl(tmp_path / "problems.jsonl", [{"prompt": f"{w} backwards:", "id": f"t-{w}"} for w in WORDS[:6]])
        out = arbor("submit", batch, *search, env=env, timeout=200)
        assert out.returncode == 0, out.stderr
        ids = out.stdout.split()
        assert len(ids) == 6 and all(store.get_job(j).status == "done" for j in ids)

        refused = _train(env)
        assert refused["candidate"] is None and refused["promoted"] is False, refused
        assert "no held-out problems for task" in refused["reason"], refused
        assert registry.promoted()[0] == "v0" and [r.version for r in store.policies()] == ["v0"]

        heldout = _jsonl(tmp_path / "heldout.jsonl", [{"prompt": f"{w} backwards:", "answer": w[::-1], "split": "heldout",
                                                       "id": f"h-{w}"} for w in WORDS[6:]])
        out = arbor("submit", heldout, *search, env=env, timeout=200)
        assert out.returncode == 0, out.stderr

        promoted = _train(env)
        assert promoted["candidate"] == "v1" and promoted["promoted"] is True and promoted["task"] is None, promoted
        assert promoted["examples"] >= 1 and set(promoted["metrics"]["heldout"]) == {"all"}
        assert registry.promoted()[0] == "v1"

        # the workers load the promoted version before their next search, without a restart
        again = _jsonl(tmp_path / "again.jsonl", [{"prompt": "ram backwards:", "id": "t-ram"}])
        out = arbor("submit", again, *search, env=env, timeout=200)
        assert out.returncode == 0, out.stderr
        assert store.get_job(out.stdout.split()[0]).result["policy_version"] == "v1"
