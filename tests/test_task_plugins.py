"""A task from outside Arbor, installed as a package with an `arbor.tasks` entry point (into a temporary folder
on PYTHONPATH), runs end to end: `arbor run --task rot13` trains on problems its generator makes and selects
with its own label check, and `arbor submit --task rot13` stores and solves a file's lines under that task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.run_store import RunStore

from agent.store import Store
from tests.support import ARBOR, seed_policy

PACKAGE = Path(__file__).parent / "plugins" / "rot13_package"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(PACKAGE)], check=True, timeout=300, cwd=build)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBOR_")}
    env.update(PYTHONPATH=os.pathsep.join([str(target), str(Path(__file__).parents[1])]), ARBOR_DEVICE="cpu",
               ARBOR_TORCH_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _arbor(*args, env, timeout=600):
    return subprocess.run([ARBOR, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_arbor_run_task_uses_the_installed_task(plugin_env, tmp_path):
    env = {**plugin_env, "ARBOR_HOME": str(tmp_path / "home")}
    out = _arbor("run", "--task", "rot13", "--cycles", "1", "--warm-start-seconds", "2", "--train-seconds", "2",
                 "--heldout", "4", "--problems-per-cycle", "8", "--json", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    last = report["cycles"][-1]
    assert last["cycle"] == 1
    assert [f["name"] for f in last["filters"]] == ["format", "vote_share", "inverse"]  # the plugin's own check
    assert "rot13" in out.stderr  # the warm start names the task it trains on
    runs = RunStore(Store(f"sqlite:///{tmp_path / 'home' / 'arbor.db'}"))
    assert runs.get(Path(report["run_dir"]).name).inputs["task"] == "rot13"  # a resumed run keeps its task


def test_arbor_submit_task_stores_and_solves_under_the_installed_task(plugin_env, tmp_path):
    env = {**plugin_env, "ARBOR_HOME": str(tmp_path / "home")}
    seed_policy(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'arbor.db'}")
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"prompt": "abc>", "answer": "nop"}\n{"prompt": "cab<", "task": "reversal"}\n')
    out = _arbor("submit", str(problems), "--task", "rot13", "--strategy", "greedy", "--max-new-tokens", "4", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    store = Store(f"sqlite:///{tmp_path / 'home' / 'arbor.db'}")
    jobs = [store.get_job(j) for j in out.stdout.split()]
    assert len(jobs) == 2 and all(j.status == "done" for j in jobs), [j.error for j in jobs]
    tasks = sorted(store.get_problem(j.problem_id).task for j in jobs)
    assert tasks == ["reversal", "rot13"]

    refused = _arbor("submit", str(problems), "--task", "nosuch_pkg:Task", env=env)
    assert refused.returncode == 1 and "--task: task 'nosuch_pkg:Task': cannot import" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
