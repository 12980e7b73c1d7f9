"""The compose topology as real processes on this machine: redis-server (append-only), PostgreSQL, two search
workers, a trainer worker and beat, each started with the same `arbor` command compose.yaml runs.

Submit, solve, a train cycle promotes a new version, and the search workers' next jobs use it without a
restart. The policy is the untrained built-in one and the train cycle fine-tunes for 2 s, so the candidate is
no better on held-out problems; ARBOR_PROMOTE_MARGIN=-1 lets it through, which is what this test is about
(the promotion rule itself is tested with the loop)."""

from __future__ import annotations

import json
import re

from agent.registry import PolicyRegistry
from agent.store import Store
from tasks import Problem
from tests.support import ArborProcess, RedisServer, arbor, arbor_env, postgres_database, seed_policy, wait_for, worker


def _jsonl(path, prefix, n):
    # no answers: the reward is the search's confidence, so every best trajectory is eligible for training
    path.write_text("".join(json.dumps({"prompt": f"{i}{i}+{i}7=", "id": f"{prefix}{i}"}) + "\n" for i in range(n)))
    return path


def test_compose_topology_submit_solve_train_promote_reload(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    procs: list[ArborProcess] = []
    try:
        with postgres_database() as db_url:
            home = tmp_path / "home"
            seed_policy(home, db_url)
            store = Store(db_url)
            registry = PolicyRegistry(home / "policies", store)
            # a small held-out set of the submitted problems' task (none named: the generic task) in the store:
            # the train cycle evaluates candidate and current on it
            store.add_problems([Problem(f"{i}+{i}=", str(2 * i)[::-1].ljust(2, "0"), split="heldout", id=f"h{i}",
                                        difficulty=1) for i in range(4)])
            env = arbor_env(home, db_url, server.url, ARBOR_VISIBILITY_TIMEOUT=300, ARBOR_LEASE_TTL=10,
                            ARBOR_TRAIN_THRESHOLD=4, ARBOR_TRAIN_EVERY_S=8, ARBOR_TRAIN_BUDGET_S=2,
                            ARBOR_PROMOTE_MARGIN=-1)
            procs += [worker("search0", "search", env, tmp_path), worker("search1", "search", env, tmp_path),
                      worker("trainer", "train,default", env, tmp_path)]
            beat = ArborProcess(["beat"], env, tmp_path / "beat.log").start()
            procs.append(beat)
            for p in procs[:3]:
                p.wait_ready()

            # greedy: one candidate per problem, so the label-free vote is unanimous and the cycle has labels
            first = arbor("submit", str(_jsonl(tmp_path / "a.jsonl", "a", 6)), "--strategy", "greedy", "--max-new-tokens", "8", "--wait",
                          "--timeout", "120", env=env)
            assert first.returncode == 0, first.stderr
            first_ids = first.stdout.split()
            assert len(first_ids) == 6 and all(store.get_job(j).result["policy_version"] == "v0" for j in first_ids)
            served = {store.get_job(j).worker for j in first_ids}

            # a train cycle starts (6 new best trajectories >= threshold 4, or beat's schedule) and promotes v1
            new = wait_for(lambda: (registry.promoted() or ("v0",))[0] != "v0" and registry.promoted()[0], 180,
                           "a train cycle to promote a new version", interval=0.5)
            trains = store.list_jobs(kind="train")
            assert trains and all(t.status == "done" for t in trains if t.result and t.result.get("promoted"))

            second = arbor("submit", str(_jsonl(tmp_path / "b.jsonl", "b", 6)), "--refine", "2", "--max-new-tokens", "8", "--wait",
                           "--timeout", "120", env=env)
            assert second.returncode == 0, second.stderr
            versions = {store.get_job(j).result["policy_version"] for j in second.stdout.split()}
            assert "v0" not in versions and new in versions | {v.version for v in store.policies()}
            for j in second.stdout.split():  # refinement through the queue: two rounds, linked, one version per job
                rows = store.trajectories(job_id=j)
                assert {t.policy_version for t in rows} == {store.get_job(j).result["policy_version"]}
                assert store.get_job(j).kind == "refine" and store.get_job(j).result["rounds"] == 2
                assert {t.round for t in rows} == {0, 1} and all(t.parent_id for t in rows if t.round == 1)
            # the same worker processes moved to the new version between jobs, without a restart
            assert {store.get_job(j).worker for j in second.stdout.split()} & served
            logs = procs[0].text() + procs[1].text()
            # (later cycles may promote again while the second batch runs: the second batch's own trajectories
            # cross the threshold too)
            assert re.search(r"loaded policy v[1-9]\d* \(was v0\)", logs)
            wait_for(lambda: "Sending due task train-cycle" in beat.text(), 30, "beat to send a train cycle")
            assert all(p.proc.poll() is None for p in procs)
    finally:
        for p in procs:
            p.stop(timeout=15)
        server.stop()
