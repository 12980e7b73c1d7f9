import pytest

from tests.support import add_trajectories
from agent.store import ProblemConflict, Store
from tasks import Problem


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    return Store(request.getfixturevalue("pg_url"))


def test_problems_are_kept_once(store):
    ids = store.add_problems([Problem("1+2=", "3", id="a"), Problem("2+2=", "4")])
    assert ids[1] == Problem("2+2=", "4").content_id()  # no id given: one derived from the content
    again = store.add_problems([Problem("1+2=", "3", id="a"), Problem("2+2=", "4")])
    assert again == ids and store.get_problem("a").prompt == "1+2="  # a resubmission changes nothing
    assert store.get_problem(ids[1]).answer == "4"


def test_an_id_taken_by_different_content_is_refused_whole(store):
    store.add_problems([Problem("1+2=", "3", id="a")])
    with pytest.raises(ProblemConflict, match="'a'.*prompt '1\\+2=' vs 'changed='"):
        store.add_problems([Problem("new=", "1", id="b"), Problem("changed=", "9", id="a")])
    assert store.get_problem("a").prompt == "1+2=" and store.get_problem("b") is None  # nothing of the call added
    with pytest.raises(ProblemConflict, match="two different problems"):
        store.add_problems([Problem("x=", "1", id="c"), Problem("y=", "1", id="c")])
    with pytest.raises(ProblemConflict, match="characters"):
        store.add_problems([Problem("x=", "1", id="i" * 201)])


def test_two_files_with_the_same_name_never_share_problems(store, tmp_path):
    from agent.jobs import submit_jobs
    from tasks.jsonl import read_problems

    for folder, prompt in (("a", "1+1="), ("b", "7+7=")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "problems.jsonl").write_text(f'{{"prompt": "{prompt}"}}\n')
    jobs = []
    for folder in ("a", "b"):
        problems, errors = read_problems(tmp_path / folder / "problems.jsonl")
        assert not errors
        jobs += submit_jobs(store, problems)
    prompts = [store.get_problem(store.get_job(j).problem_id).prompt for j in jobs]
    assert prompts == ["1+1=", "7+7="]  # b's job solves b's prompt


@pytest.mark.parametrize("rounds", [0, -1, 21, 10**9, 2**63, True, 2.5, "3"])
def test_rounds_out_of_range_are_refused_before_anything_is_written(store, rounds):
    from agent.schema import MAX_REFINE_ROUNDS, RoundsOutOfRange

    assert MAX_REFINE_ROUNDS == 20  # the web form's bound (arbor/web/templates/jobs.html)
    with pytest.raises(RoundsOutOfRange) as err:
        store.submit([Problem("1+2=", "3", id="r1")], "refine", rounds, {"search": {}})
    assert f"from 1 to {MAX_REFINE_ROUNDS}" in str(err.value) and "\n" not in str(err.value)
    assert store.get_problem("r1") is None and store.list_jobs() == []  # nothing of the call written
    (job,) = store.submit([Problem("1+2=", "3", id="r1")], "refine", MAX_REFINE_ROUNDS, {"search": {}})
    assert store.get_job(job).rounds == MAX_REFINE_ROUNDS


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
    add_trajectories(store, [dict(problem_id="p", completion="3", token_count=1, mean_logprob=-0.1, min_logprob=-0.2,
                                 mean_entropy=0.3, score=-0.1, verified=True, policy_version="v0", strategy="greedy",
                                 search_stats={"forward_passes": 2}, is_best=True)])
    (row,) = store.trajectories(best_only=True)
    assert row.verified and row.search_stats == {"forward_passes": 2}
    store.record_policy("v0", "/x/v0", None, "candidate", {}, {})
    store.record_policy("v1", "/x/v1", "v0", "candidate", {}, {})
    store.promote_policy("v0")
    store.promote_policy("v1", metrics={"acc": 0.5})
    statuses = {r.version: r.status for r in store.policies()}
    assert statuses == {"v0": "retired", "v1": "promoted"}
    assert store.promoted_policy().metrics == {"acc": 0.5}


def _best(store, problem_id, job_id=None, cycle=None, consumed=False):
    add_trajectories(store, [dict(problem_id=problem_id, job_id=job_id, cycle=cycle, completion="x", token_count=1,
                                 mean_logprob=-1.0, min_logprob=-1.0, mean_entropy=0.1, score=-1.0, verified=False,
                                 policy_version="v0", strategy="greedy", is_best=True, consumed=consumed)])


def test_the_train_trigger_counts_what_a_train_cycle_consumes(store):
    from sqlalchemy import event

    store.add_problems([Problem("h=", "1", task="addition", split="heldout", id="h"), Problem("a=", "1", task="addition", id="a"),
                        Problem("u=", "1", task=None, id="u")])
    jobs = [store.create_job("solve", pid) for pid in ("a", "a", "u")]
    _best(store, "a", job_id=jobs[0])
    _best(store, "a", job_id=jobs[1])
    _best(store, "u", job_id=jobs[2])  # a task with no held-out problems: a cycle cannot train on it (it waits)
    _best(store, "a", cycle=3)  # the loop's own result, rejected by the loop's selection: judged already
    statements = []
    event.listen(store.engine, "before_cursor_execute", lambda c, cur, sql, *a: statements.append(sql))
    assert store.count_untrained_best() == 3 and store.count_trainable() == 2
    statements = [s for s in statements if "trajectories" in s]
    assert len(statements) == 2 and all("count(" in s.lower() for s in statements)  # one COUNT each, no rows fetched
    ids = [t.id for t in store.trajectories(best_only=True) if t.job_id in jobs[:2]]
    store.mark_consumed(ids)  # what a train cycle does with every result it judged, accepted or not
    assert store.count_trainable() == 0 and store.count_untrained_best() == 1


def test_a_database_from_before_the_one_replay_table_is_migrated_once(store):
    """Run labels (the old run_labels table) and train-cycle labels (trajectory ids listed in a version's trained_on)
    move to the one replay_labels table, and a trajectory's trained_on flag becomes `consumed`, once; a second
    Store() on the migrated database changes nothing."""
    from sqlalchemy import delete, inspect, text

    from agent.run_store import RunStore
    from agent.schema import SchemaVersionRow

    store.add_problems([Problem("a=", "1", id="a"), Problem("b=", "2", id="b")])
    add_trajectories(store, [dict(problem_id=p, completion=c, token_count=1, mean_logprob=-0.1, min_logprob=-0.1,
                                  mean_entropy=0.1, score=-0.1, verified=None, policy_version="v0", strategy="greedy",
                                  is_best=True) for p, c in (("a", "1"), ("b", "2"))])
    ids = [t.id for t in store.trajectories()]
    store.mark_consumed(ids[:1])
    store.record_policy("v1", "/x/v1", None, "rejected", {"source": "store", "task": None, "labels": ids}, {})
    RunStore(store).create("r", {}, {})
    with store.session() as s:  # the state of a database written before the migration
        s.execute(delete(SchemaVersionRow))
        s.execute(text("CREATE TABLE run_labels (run VARCHAR(100), cycle INTEGER, seq INTEGER, problem_id VARCHAR(200), "
                       "prompt TEXT, completion TEXT)"))
        s.execute(text("INSERT INTO run_labels VALUES ('r', 1, 0, 'a', 'a=', '1')"))
        s.execute(text("ALTER TABLE trajectories RENAME COLUMN consumed TO trained_on"))
    for _ in range(2):
        migrated = Store(store.url)
        assert [(lab.cycle, lab.prompt, lab.completion) for lab in RunStore(migrated).labels("r")] == [(1, "a=", "1")]
        assert migrated.replay_labels("store:", 10) == [{"prompt": "a=", "completion": "1"},
                                                        {"prompt": "b=", "completion": "2"}]
        assert [t.consumed for t in migrated.trajectories()] == [True, False]
        assert next(r for r in migrated.policies() if r.version == "v1").trained_on == {
            "source": "store", "task": None, "replayed_labels": 2}
    with migrated.session() as s:
        assert "run_labels" not in inspect(s.connection()).get_table_names()
