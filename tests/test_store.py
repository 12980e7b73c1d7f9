import pytest

from agent.store import Store
from tasks import Problem


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    return Store(request.getfixturevalue("pg_url"))


def test_problems_are_kept_once(store):
    ids = store.add_problems([Problem("1+2=", "3", id="a"), Problem("2+2=", "4")])
    again = store.add_problems([Problem("changed=", "9", id="a")])
    assert again == ["a"] and store.get_problem("a").prompt == "1+2="
    assert store.get_problem(ids[1]).answer == "4"


def test_job_finishes_exactly_once(store):
    (pid,) = store.add_problems([Problem("1+2=", "3", id="p")])
    job = store.create_job("solve", pid)
    assert store.start_job(job, "w1")
    assert store.finish_job(job, {"best": "3"})
    assert not store.finish_job(job, {"best": "wrong"})  # a redelivery changes nothing
    assert not store.start_job(job, "w2")
    row = store.get_job(job)
    assert row.status == "done" and row.result == {"best": "3"} and row.attempts == 2


def test_trajectories_and_policy_versions(store):
    store.add_problems([Problem("1+2=", "3", id="p")])
    store.add_trajectories([dict(problem_id="p", completion="3", token_count=1, mean_logprob=-0.1, min_logprob=-0.2,
                                 mean_entropy=0.3, score=-0.1, verified=True, policy_version="v0", strategy="greedy",
                                 search_stats={"forward_passes": 2}, is_best=True)])
    (row,) = store.trajectories(best_only=True)
    assert row.verified and row.search_stats == {"forward_passes": 2}
    store.record_policy("v0", "/x/v0", None, "candidate", {}, {})
    store.record_policy("v1", "/x/v1", "v0", "candidate", {}, {})
    store.set_policy_status("v0", "promoted")
    store.set_policy_status("v1", "promoted", {"acc": 0.5})
    statuses = {r.version: r.status for r in store.policies()}
    assert statuses == {"v0": "retired", "v1": "promoted"}
    assert store.promoted_policy().metrics == {"acc": 0.5}
