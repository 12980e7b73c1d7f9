"""A run of `arbor run` kept in the store (agent/store.py RunStore, agent/runner.py): each cycle is recorded once
with what it wrote, a run killed at any point resumes after its last recorded cycle, and a new run never demotes
a policy an earlier run improved. The store tests run on SQLite and PostgreSQL; the runs on a tiny user task."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from agent.config import LoopConfig, WarmStartConfig
from agent.runner import RunError, RunInputs, run_main
from agent.config import SelectConfig
from agent.settings import Settings
from agent.run_store import CycleRecorded, RunExists, RunStore
from agent.store import Store
from agent.config import TrainConfig
from search import SearchConfig
from tasks import Problem
from tests.support import wait_for


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    return Store(request.getfixturevalue("pg_url"))


def _row(problem_id, cycle, trained=False):
    return dict(problem_id=problem_id, cycle=cycle, completion="1", token_count=1, mean_logprob=-0.1, min_logprob=-0.1,
                mean_entropy=0.1, score=-0.1, verified=None, policy_version="v0", strategy="greedy", is_best=True,
                consumed=trained)


def _cycle(record: dict, state: dict):
    """RunStore.record_cycle's `written`: the same record and state whatever the promotion's outcome."""
    return lambda promoted: ({**record, "promoted": promoted}, state)


def test_a_cycle_is_recorded_once_with_all_it_wrote(store):
    store.add_problems([Problem("a=", "1", id="a"), Problem("b=", "2", id="b")])
    runs = RunStore(store)
    runs.create("r", {"cycles": 3}, {})
    with pytest.raises(RunExists):
        runs.create("r", {}, {})
    store.record_policy("v0", "/x/v0", None, "promoted", {}, {})
    store.record_policy("v1", "/x/v1", "v0", "candidate", {"run": "r", "cycle": 1}, {})
    runs.set_base("r", "v0", promote=True)
    runs.record_cycle("r", 0, _cycle({"cycle": 0, "candidate": None}, {"known": {}}))
    assert [v.version for v in runs.unrecorded_versions("r")] == ["v1"]  # saved, its cycle not recorded yet

    label = {"prompt": "a=", "completion": "1", "problem_id": "a"}
    runs.record_cycle("r", 1, _cycle({"cycle": 1, "candidate": "v1"}, {"known": {"all": 1.0}}), labels=[label],
                      trajectories=[_row("a", 1, trained=True), _row("b", 1)], candidate="v1", promote=True, parent="v0")
    assert {r.version: r.status for r in store.policies()} == {"v0": "retired", "v1": "promoted"}  # in the same commit
    assert runs.unrecorded_versions("r") == []
    with pytest.raises(CycleRecorded, match="cycle 1 of run 'r' is already recorded"):
        runs.record_cycle("r", 1, _cycle({"cycle": 1, "candidate": "v1"}, {"known": {}}), labels=[label],
                          trajectories=[_row("a", 1, trained=True)], candidate="v1", promote=True, parent="v0")
    assert len(store.trajectories(cycle=1)) == 2 and len(runs.labels("r")) == 1  # the second try wrote nothing
    assert [(c.cycle, c.state) for c in runs.cycles("r")] == [(0, {"known": {}}), (1, {"known": {"all": 1.0}})]

    # a candidate that is not undecided any more: the cycle is refused whole
    store.record_policy("v2", "/x/v2", "v1", "rejected", {"run": "r", "cycle": 2}, {})
    with pytest.raises(RuntimeError, match="v2 is rejected, expected an undecided candidate"):
        runs.record_cycle("r", 2, _cycle({"cycle": 2, "candidate": "v2"}, {"known": {}}), labels=[label],
                          trajectories=[_row("a", 2)], candidate="v2")
    assert [c.cycle for c in runs.cycles("r")] == [0, 1] and store.trajectories(cycle=2) == [] and len(runs.labels("r")) == 1
    with pytest.raises(RuntimeError, match="only an undecided version"):
        runs.delete_undecided_policy("v1")


def test_a_candidate_whose_parent_was_demoted_meanwhile_is_recorded_stale_not_promoted(store):
    """The promotion is a compare-and-set on the version the candidate was judged against: an operator who promoted
    another version while the cycle trained wins, and the cycle's record says what happened."""
    runs = RunStore(store)
    runs.create("r", {}, {})
    store.record_policy("v0", "/x/v0", None, "candidate", {}, {})
    store.record_policy("v1", "/x/v1", None, "candidate", {}, {})
    store.record_policy("v2", "/x/v2", "v0", "candidate", {"run": "r", "cycle": 1}, {})
    runs.set_base("r", "v0", promote=True)
    runs.record_cycle("r", 0, _cycle({"cycle": 0}, {}))
    store.promote_policy("v1", expected="v0")  # the operator, while cycle 1 trains v2 from v0
    assert runs.record_cycle("r", 1, _cycle({"cycle": 1}, {}), candidate="v2", promote=True, parent="v0") is False
    assert {r.version: r.status for r in store.policies()} == {"v0": "retired", "v1": "promoted", "v2": "stale"}
    assert runs.cycles("r")[1].record == {"cycle": 1, "promoted": False}
    assert not store.promote_policy("v0", expected="v2") and store.promoted_policy().version == "v1"


def test_a_run_base_is_promoted_only_when_nothing_is(store):
    runs = RunStore(store)
    for name in ("first", "second"):
        runs.create(name, {}, {})
    store.record_policy("v0", "/x/v0", None, "candidate", {"run": "first"}, {})
    runs.set_base("first", "v0", promote=True)
    assert store.promoted_policy().version == "v0"
    store.record_policy("v1", "/x/v1", "v0", "candidate", {}, {})
    store.promote_policy("v1")  # what the first run improved
    store.record_policy("v2", "/x/v2", None, "candidate", {"run": "second"}, {})
    runs.set_base("second", "v2", promote=True)
    assert store.promoted_policy().version == "v1" and runs.get("second").base_version == "v2"


# runs on a tiny user task ----------------------------------------------------------------------------------------

class Killed(BaseException):
    """SIGKILL in process: no `except Exception` handles it, nothing after the raise runs."""


WORDS = ["ab", "cd", "efg", "hij", "kl", "mno", "pq", "rst", "uv", "wxy", "za", "bcd", "ef", "ghi", "jk", "lmn",
         "op", "qrs", "tu", "vwx", "yz", "abc", "de", "fgh"]


def _files(folder):
    demos, problems = folder / "demos.jsonl", folder / "problems.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"first {w}:", "completion": w[0]}) + "\n" for w in WORDS[:16]))
    rows = [{"prompt": f"first {w}:", "answer": w[0], "split": "train"} for w in WORDS]
    rows += [{"prompt": f"first {w}:", "answer": w[0], "split": "heldout", "id": f"h-{w}"} for w in WORDS[16:]]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return demos, problems


def tiny(**changes) -> LoopConfig:
    # greedy label-free selection keeps every well-formed answer: every cycle trains and saves a candidate
    cfg = LoopConfig(cycles=2, problems_per_cycle=8, examples_per_cycle=64,
                     search=SearchConfig(strategy="greedy"), select=SelectConfig(mode="label_free"),
                     train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=3),
                     warm_start=WarmStartConfig(mastery=None, train=TrainConfig(learning_rate=3e-3, time_budget_s=120.0, max_steps=40,
                                                                  schedule="time_cosine")))
    return replace(cfg, **changes)


def _no_orphans(store: Store, runs: RunStore, name: str, searched: int = 8) -> list:
    """The run's records, after checking that the store holds each of its rows once and nothing it does not name
    (`searched`: problems per cycle)."""
    records = [c.record for c in runs.cycles(name)]
    assert [r["cycle"] for r in records] == list(range(len(records)))
    assert runs.unrecorded_versions(name) == []
    statuses = {r.version: r.status for r in store.policies()}
    assert all(statuses[r["candidate"]] in ("promoted", "rejected", "retired") for r in records if r["candidate"])
    assert [v for v, s in statuses.items() if s in ("saving", "candidate") and v != runs.get(name).base_version] == []
    rows = store.trajectories()
    assert {t.cycle for t in rows} == {r["cycle"] for r in records if r["cycle"] > 0}
    for r in records[1:]:
        best = [t for t in rows if t.cycle == r["cycle"] and t.is_best]
        assert len(best) == searched  # the cycle's rows were written once
        assert sum(t.consumed for t in best) == r["accepted"] == sum(lab.cycle == r["cycle"] for lab in runs.labels(name))
    return records


def test_killed_between_saving_a_candidate_and_recording_its_cycle(tmp_path, monkeypatch, one_torch_thread):
    settings = Settings(home=tmp_path / "home", device="cpu")
    demos, problems = _files(tmp_path)
    record_cycle = RunStore.record_cycle

    def killed_at_cycle_2(self, name, cycle, *args, **kwargs):
        if cycle == 2:
            raise Killed()
        return record_cycle(self, name, cycle, *args, **kwargs)

    monkeypatch.setattr(RunStore, "record_cycle", killed_at_cycle_2)
    with pytest.raises(Killed):
        run_main(settings, tiny(), RunInputs(demos=demos, problems=problems, run_name="r"))
    monkeypatch.undo()
    store = Store(settings.db_url)
    runs = RunStore(store)
    assert [c.cycle for c in runs.cycles("r")] == [0, 1]
    assert [(v.status, v.trained_on["cycle"]) for v in runs.unrecorded_versions("r")] == [("candidate", 2)]
    assert store.trajectories(cycle=2) == [] and {lab.cycle for lab in runs.labels("r")} <= {1}

    events = []
    report = run_main(settings, tiny(), RunInputs(resume="r"), lambda kind, payload: events.append((kind, payload)))
    assert [p for k, p in events if k == "warning"] == ["discarded policy v2: saved by run r before it was stopped, never recorded"]
    assert [p.cycle for k, p in events if k == "cycle"] == [0, 1, 2]  # the recorded cycles are shown again first
    records = _no_orphans(store, runs, "r")
    assert [c["cycle"] for c in report["cycles"]] == [0, 1, 2] and report["cycles"] == records  # rebuilt from the store
    assert records[2]["candidate"] == "v2" and records[2]["elapsed_s"] >= records[1]["elapsed_s"]
    assert json.loads((tmp_path / "home/runs/r/report.json").read_text())["cycles"] == records
    assert (tmp_path / "home/runs/r/learning_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "home/policies").iterdir()) == sorted(r.version for r in store.policies())


@pytest.mark.parametrize("recorded_before_evaluations_were_kept", [False, True])
def test_a_resumed_cycle_selects_with_the_same_filters_and_floor_as_the_uninterrupted_one(
        tmp_path, monkeypatch, one_torch_thread, recorded_before_evaluations_were_kept):
    """A file task without label checks calibrates its confidence floor on the current policy's evaluation: a resumed
    run rebuilds that evaluation from the store, so its first cycle filters exactly as the killed process would have.
    A run recorded before evaluations were kept evaluates its policy again on resume, with the same result."""
    settings = Settings(home=tmp_path / "home", device="cpu")
    demos, problems = _files(tmp_path)
    record_cycle, first_try = RunStore.record_cycle, {}

    def killed_recording_cycle_2(self, name, cycle, written, *args, **kwargs):
        if cycle == 2:
            first_try.update(written(False)[0])  # what the uninterrupted run would have recorded
            raise Killed()
        return record_cycle(self, name, cycle, written, *args, **kwargs)

    monkeypatch.setattr(RunStore, "record_cycle", killed_recording_cycle_2)
    inputs = RunInputs(demos=demos, problems=problems, run_name="r", select_given=True)  # label-free, answers unread
    cfg = tiny(threshold=0.2)  # "mastered" where a fifth is right: this tiny policy masters some length by cycle 2
    with pytest.raises(Killed):
        run_main(settings, cfg, inputs)
    monkeypatch.undo()
    floors = [f for f in first_try["filters"] if f["name"] == "calibrated_confidence"]
    assert floors and floors[0]["floor"] < 0  # the policy had mastered a length: the floor was in force
    if recorded_before_evaluations_were_kept:
        from agent.schema import RunCycleRow

        with Store(settings.db_url).session() as session:
            for row in session.query(RunCycleRow):
                row.state = {k: v for k, v in row.state.items() if k != "evaluation"}
    run_main(settings, cfg, RunInputs(resume="r"))
    resumed = RunStore(Store(settings.db_url)).cycles("r")[2].record
    assert [(f["name"], f.get("floor"), f["kept"]) for f in resumed["filters"]] == \
        [(f["name"], f.get("floor"), f["kept"]) for f in first_try["filters"]]


def test_a_file_task_without_checks_filters_labels_by_a_judge_learned_from_its_demonstrations(tmp_path, one_torch_thread):
    """Label-free, no label checks, a value floor: before the first selection the base version gets a value model
    trained on the demonstrations against its own different answers (kept beside it), the labels pass through its
    floor, and the promoted candidate's judge learns from the demonstrations against the candidate's answers."""
    from agent.config import ValueConfig
    from agent.registry import PolicyRegistry, value_folder

    settings = Settings(home=tmp_path / "home", device="cpu")
    demos, problems = _files(tmp_path)
    cfg = tiny(cycles=1, promote_margin=-1.0, value_model=True, value_demonstrations=8, value_refresh_auroc=1.0,
               value=ValueConfig(time_budget_s=5.0, trunk_batch=16, epochs=1),
               search=SearchConfig(strategy="best_of_n", n=4, temperature=1.0),
               # a floor this tiny judge passes (what a floor keeps and drops: tests/test_value.py)
               select=SelectConfig(mode="label_free", min_value=1e-4, calibration_quantile=None))
    run_main(settings, cfg, RunInputs(demos=demos, problems=problems, run_name="r", select_given=True))
    record = RunStore(Store(settings.db_url)).cycles("r")[1].record
    stages = [f["name"] for f in record["filters"]]
    assert stages == ["format", "vote_share", "value"] and record["filters"][-1]["floor"] == 1e-4
    assert 0 < record["filters"][-1]["kept"] <= record["filters"][-2]["kept"]
    assert record["accepted"] == record["filters"][-1]["kept"]
    registry = PolicyRegistry(settings.policies_dir, Store(settings.db_url))
    base = registry.load("v0")
    assert base.value_model is not None and value_folder(registry, "v0").is_dir()
    # 8 demonstrations, each with its right completion, the policy's samples (4 each) and its branches off each (2),
    # the finished ones
    assert 8 < base.value_model.meta["completions"] <= 8 * (1 + 4 + 2)
    assert record["promoted"] and record["value"]["continued_from"] == "v0" and record["seconds"]["value"] > 0
    assert registry.load("v1").value_model.meta["steps"] > 0


def test_a_value_floor_without_a_value_model_is_refused_in_one_line():
    with pytest.raises(ValueError, match="--value-model"):
        tiny(select=SelectConfig(mode="label_free", min_value=0.5))


def test_rows_are_marked_trained_only_with_their_cycle(tmp_path, monkeypatch, one_torch_thread):
    settings = Settings(home=tmp_path / "home", device="cpu")
    demos, problems = _files(tmp_path)

    def killed(*_):
        raise Killed()

    monkeypatch.setattr("agent.gate.clone_for_training", killed)  # the cycle's fine-tune starts here
    with pytest.raises(Killed):
        run_main(settings, tiny(cycles=1), RunInputs(demos=demos, problems=problems, run_name="r"))
    monkeypatch.undo()
    store = Store(settings.db_url)
    assert [t for t in store.trajectories() if t.consumed] == []  # the selection ran, the training did not finish
    run_main(settings, tiny(cycles=1), RunInputs(resume="r"))
    records = _no_orphans(store, RunStore(store), "r")
    assert records[1]["accepted"] > 0 and records[1]["candidate"] is not None


def test_a_new_run_never_demotes_what_an_earlier_run_improved(tmp_path, one_torch_thread):
    settings = Settings(home=tmp_path / "home", device="cpu")
    demos, problems = _files(tmp_path)
    # a margin of -1 promotes any candidate: run a improves on its base for sure
    run_main(settings, tiny(cycles=1, promote_margin=-1.0), RunInputs(demos=demos, problems=problems, run_name="a"))
    store = Store(settings.db_url)
    runs = RunStore(store)
    improved = runs.cycles("a")[1].record
    assert improved["promoted"] and store.promoted_policy().version == improved["policy_version"] == "v1"

    run_main(settings, tiny(cycles=0), RunInputs(demos=demos, problems=problems, run_name="b"))  # the same files again
    run_main(settings, tiny(cycles=0), RunInputs(model=tmp_path / "home/policies/v0", run_name="c"))
    assert store.promoted_policy().version == "v1"
    assert [runs.get(n).base_version for n in "abc"] == ["v0", "v2", "v3"]
    assert {r.version: r.status for r in store.policies()} == {"v0": "retired", "v1": "promoted", "v2": "candidate", "v3": "candidate"}

    # resumed, run a goes on from its own promoted version with its own settings; no second base
    report = run_main(settings, tiny(cycles=5), RunInputs(resume="a", changes={"cycles": 2}))
    assert [c["cycle"] for c in report["cycles"]] == [0, 1, 2]
    assert {t.policy_version for t in store.trajectories(cycle=2)} == {"v1"}
    assert runs.get("a").config["cycles"] == 2 and runs.get("a").config["promote_margin"] == -1.0
    assert [r.version for r in store.policies() if (r.trained_on or {}).get("run") == "a" and r.parent is None] == ["v0"]


def test_run_names_and_resume_errors(tmp_path):
    settings = Settings(home=tmp_path / "home", device="cpu")
    for bad in ("../x", "a/b", "..", ".hidden", "a\\b", "x" * 101):
        with pytest.raises(RunError, match="is not a plain name"):
            run_main(settings, tiny(), RunInputs(run_name=bad))
    with pytest.raises(RunError, match="no run 'nope' in the store"):
        run_main(settings, tiny(), RunInputs(resume="nope"))
    RunStore(Store(settings.db_url)).create("taken", {}, {})
    with pytest.raises(RunError, match="^run 'taken' already exists: continue it with --resume taken, or choose another --run-name$"):
        run_main(settings, tiny(), RunInputs(run_name="taken"))
    with pytest.raises(RunError, match="drop --problems"):
        run_main(settings, tiny(), RunInputs(resume="taken", problems=tmp_path / "p.jsonl"))
    with pytest.raises(RunError, match="only cycles, time_budget_s may change"):
        run_main(settings, tiny(), RunInputs(resume="taken", changes={"seed": 3}))
    assert not (tmp_path / "x").exists() and not (tmp_path / "home/x").exists()


# `arbor run` processes, SIGKILLed ------------------------------------------------------------------------------------

def _warm_model(folder, demos, problems):
    """A built-in policy trained on the demos, saved as a user's model folder: greedy answers well formed at once."""
    from agent.config import BuiltinConfig
    from agent.policy import DEFAULT_CHARSET, build_builtin_policy
    from agent.trainer import SFTFineTuner
    from tasks.jsonl import read_demos

    pairs = read_demos(demos)[0]
    charset = "".join(sorted(set(problems.read_text() + DEFAULT_CHARSET)))
    model, tokenizer = build_builtin_policy(BuiltinConfig(position_scheme="sequential", seed=0), charset)
    SFTFineTuner(TrainConfig(learning_rate=3e-3, time_budget_s=120.0, max_steps=40, schedule="time_cosine")).train(model, tokenizer, pairs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sigkilled_three_times_then_resumed(tmp_path, request, database, one_torch_thread):
    seed = int(os.environ.get("ARBOR_TEST_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    began = time.monotonic()
    home = tmp_path / "home"
    db_url = f"sqlite:///{home / 'arbor.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    demos, problems = _files(tmp_path)
    model = _warm_model(tmp_path / "model", demos, problems)
    # one OpenMP thread as well: with faiss loaded beside torch, the default made fine-tunes ~30x slower here
    env = {**os.environ, "ARBOR_HOME": str(home), "ARBOR_DATABASE_URL": db_url, "ARBOR_DEVICE": "cpu",
           "ARBOR_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ARBOR_BROKER_URL", None)
    store = Store(db_url)
    runs = RunStore(store)
    # greedy label-free selection: every cycle trains and saves a candidate, so kills land in search, training,
    # evaluation, the save and the record alike
    start = ["run", "--model", str(model), "--problems", str(problems), "--select", "label_free", "--strategy", "greedy",
             "--samples", "1", "--problems-per-cycle", "16", "--train-seconds", "1", "--cycles", "100", "--run-name", "k",
             "--stop-after-rejections", "0"]  # a long run to kill, whatever its gate decides
    log = tmp_path / "arbor.log"
    kills, window = [], []

    def undecided():
        return [(r.version, r.status) for r in store.policies()
                if (r.trained_on or {}).get("run") == "k" and r.parent is not None and r.status in ("saving", "candidate")]

    for launch in range(3):
        recorded = len(runs.cycles("k"))
        with open(log, "a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "arbor", *(start if launch == 0 else ["run", "--resume", "k"])],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # the first launch is killed anywhere from the run's creation on (its base policy's save included), the
            # third once it has recorded a cycle of its own, somewhere in the next (a cycle: 5-10 s); the second the
            # moment a candidate is being saved or saved and its cycle not yet recorded, the narrowest window
            progress = (lambda: runs.get("k") is not None) if launch == 0 else (lambda: len(runs.cycles("k")) > recorded)
            wait_for(lambda: proc.poll() is not None or progress(), 300, f"launch {launch} to make progress")
            if launch == 1:
                wait_for(lambda: proc.poll() is not None or undecided(), 300, "a candidate being saved", interval=0.01)
                window.append(undecided())
            else:
                time.sleep(rng.uniform(0, 8))
            assert proc.poll() is None, f"launch {launch} ended with {proc.returncode} before its kill:\n{log.read_text()[-3000:]}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kills.append(len(runs.cycles("k")))
    print(f"seed {seed}: killed with {kills} cycles recorded, the second kill with {window[0]} undecided; "
          f"{log.read_text().count('discarded policy')} unrecorded candidate(s) discarded on resume")
    last = len(runs.cycles("k"))
    final = subprocess.run([sys.executable, "-m", "arbor", "run", "--resume", "k", "--cycles", str(max(last, 3)), "--json"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, f"seed {seed}\n{final.stderr[-3000:]}"
    print(f"seed {seed}: {time.monotonic() - began:.0f} s in all")

    records = _no_orphans(store, runs, "k", searched=16)
    assert [r["cycle"] for r in records] == list(range(max(last, 3) + 1))
    report = json.loads(final.stdout.strip().splitlines()[-1])
    assert report["cycles"] == records == json.loads((home / "runs/k/report.json").read_text())["cycles"]
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(records, records[1:]))  # one continuous curve
    base = runs.get("k").base_version
    assert records[0]["policy_version"] == base
    for before, r in zip(records, records[1:]):  # each cycle went on from the policy the previous one left
        assert r["policy_version"] == (r["candidate"] if r["promoted"] else before["policy_version"])
    assert store.promoted_policy().version == next((r["candidate"] for r in reversed(records) if r["promoted"]), base)
    folders = {p.name for p in (home / "policies").iterdir()}
    assert folders <= {r.version for r in store.policies()}  # no .tmp-* left, no vN without its row
    assert {r["policy_version"] for r in records} <= folders  # rejected candidates' folders may be pruned, never these
    assert runs.get("k").status == "finished"
