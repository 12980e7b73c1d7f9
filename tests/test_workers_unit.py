"""The plain functions under the Celery tasks, without a broker: refinement, exactly-once recording, leases,
the policy cache, the Celery settings, and the queue CLI's in-process path and error messages."""

from __future__ import annotations

import json
import threading
import time

import pytest
from typer.testing import CliRunner

from agent.refine import judge_attempts, refine, refine_rows, round_prompt, tried
from tasks import Problem, Task
from search import Candidate, SearchConfig, SearchResult
from workers.config import QueueConfig, celery_settings
from tests.support import RedisServer, free_port


def _cand(text, verified, score):
    return Candidate(text, [1] * len(text), score, score, 0.5, True, verified=verified, score=score)


class _Scripted:
    """Stands in for agent.refine.search_problems: returns one scripted best attempt per round and records the prompts."""

    def __init__(self, attempts):
        self.attempts, self.prompts = list(attempts), []

    def __call__(self, problems, policy, cfg):
        self.prompts.append(problems[0].prompt)
        text, verified, score = self.attempts.pop(0)
        return [SearchResult(problems[0], [_cand(text, verified, score), _cand("x", False, -9.0)], "greedy", "v0")]


def test_refine_stops_when_verified_and_links_rounds(monkeypatch):
    scripted = _Scripted([("12", False, -1.0), ("13", False, -2.0), ("579", True, -0.5), ("never", True, 0.0)])
    monkeypatch.setattr("agent.refine.search_problems", scripted)
    problem = Problem("123+456=", "579", id="p1")
    rounds = refine(problem, policy=None, cfg=SearchConfig(), rounds=5)
    assert len(rounds) == 3  # stopped at the verified attempt, not after 5 rounds
    assert scripted.prompts[0] == "123+456="
    # round 2 shows every attempt so far, oldest first, with the checker's verdicts
    assert scripted.prompts[2] == ("# attempt: 12\n# feedback: rejected by the exact checker\n"
                                   "# attempt: 13\n# feedback: rejected by the exact checker\n123+456=")
    rows, parents = refine_rows(problem, rounds, job_id=None)
    assert parents == [None, 0, 0]
    assert [r["is_best"] for rr in rows for r in rr].count(True) == 1 and rows[2][0]["is_best"]
    assert rows[0][0]["prompt"] is None and rows[1][0]["prompt"].startswith("# attempt: 12")
    assert [t["verdict"] for t in tried(rounds)] == ["rejected by the exact checker"] * 2 + ["accepted by the exact checker"]


def test_refine_without_checker_feeds_back_confidence(monkeypatch):
    monkeypatch.setattr("agent.refine.search_problems", _Scripted([("a", None, -1.25), ("b", None, -0.5)]))
    rounds = refine(Problem("say hi"), policy=None, cfg=SearchConfig(), rounds=2)
    assert len(rounds) == 2  # nothing to verify: all R rounds
    assert "confidence -1.25" in rounds[1].result.problem.prompt
    # the answer never leaks into a verdict
    (verdict,) = judge_attempts([Problem("1+2=", "579")], [_cand("3", False, -1.0)], Task(), None)
    assert "579" not in round_prompt(Problem("1+2=", "579"), [("3", verdict.text)])


class _Repeating:
    """Stands in for agent.refine.search_problems: answers from a fixed list per search, so that a round's first
    searches repeat what was already rejected."""

    def __init__(self, answers):
        self.answers, self.searches = list(answers), []

    def __call__(self, problems, policy, cfg):
        self.searches.append((problems[0].prompt, cfg.strategy, cfg.seed))
        text = self.answers.pop(0)
        return [SearchResult(problems[0], [_cand(text, text == "579", -1.0)], cfg.strategy, "v0", generated_tokens=3)]


def test_a_refinement_job_never_answers_a_rejected_answer_twice(monkeypatch):
    # round 0 says 12; round 1's greedy search says 12 again and is resampled (at T=1) until it says 13; round 2's
    # searches say 12, 13, 12, 13: nothing new in four searches, so the job stops there
    search = _Repeating(["12", "12", "12", "13", "12", "13", "12", "13"])
    monkeypatch.setattr("agent.refine.search_problems", search)
    rounds = refine(Problem("123+456=", "579", id="p1"), policy=None, cfg=SearchConfig(strategy="greedy"), rounds=4)
    answers = [x.best.completion for x in rounds]
    assert answers == ["12", "13"] and len(set(answers)) == len(answers)
    assert [x.resamples for x in rounds] == [0, 2]
    assert [s[1] for s in search.searches[1:4]] == ["greedy", "best_of_n", "best_of_n"]  # greedy would repeat itself
    assert rounds[1].result.generated_tokens == 9  # the resamples' tokens are counted
    assert len(search.searches) == 8 and not search.answers


def test_celery_settings_follow_the_notes(monkeypatch):
    monkeypatch.setenv("ARBOR_VISIBILITY_TIMEOUT", "21600")
    s = celery_settings(QueueConfig())
    assert s["task_acks_late"] and s["task_reject_on_worker_lost"] and s["worker_prefetch_multiplier"] == 1
    assert s["accept_content"] == ["json"] and s["task_serializer"] == "json"
    vts = {s["visibility_timeout"], s["broker_transport_options"]["visibility_timeout"],
           s["result_backend_transport_options"]["visibility_timeout"]}
    assert vts == {21600} and s["task_time_limit"] == 21600 - 900 and s["task_soft_time_limit"] == 21600 - 1800
    assert s["worker_proc_alive_timeout"] >= 60
    monkeypatch.setenv("ARBOR_VISIBILITY_TIMEOUT", "4")
    short = celery_settings(QueueConfig())
    assert short["task_time_limit"] < 4 and short["broker_transport_options"]["unacked_restore_interval"] == 1


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An ARBOR_HOME with a SQLite store and the untrained built-in policy promoted as v0."""
    from tests.support import seed_policy

    path = tmp_path_factory.mktemp("home")
    seed_policy(path, f"sqlite:///{path / 'arbor.db'}")
    return path


@pytest.fixture()
def store_registry(home):
    from agent.registry import PolicyRegistry
    from agent.store import Store

    store = Store(f"sqlite:///{home / 'arbor.db'}")
    return store, PolicyRegistry(home / "policies", store)


def test_run_job_twice_writes_once_and_cache_reloads_between_jobs(store_registry):
    from agent.policy import build_builtin_policy
    from workers.cache import PolicyCache
    from agent.jobs import run_job, submit_jobs

    store, registry = store_registry
    cache = PolicyCache(registry)
    a, b = submit_jobs(store, [Problem("12+34=", "640", id="u1"), Problem("5+5=", "01", id="u2")], rounds=2,
                       search={"strategy": "greedy", "max_new_tokens": 4})
    first = run_job(store, a, cache.get, "t")
    assert first["status"] == "done" and first["result"]["policy_version"] == "v0"
    n = len(store.trajectories(job_id=a))
    assert run_job(store, a, cache.get, "t") == first  # delivered again after it finished: nothing changes
    assert len(store.trajectories(job_id=a)) == n and store.get_job(a).attempts == 1
    # a new promoted version is picked up by the next job, never inside one
    model, tok = build_builtin_policy()
    v1 = registry.save(model, tok, parent="v0", trained_on={})
    registry.promote(v1, {})
    assert run_job(store, b, cache.get, "t")["result"]["policy_version"] == v1 and cache.loads == 2
    registry.promote("v0", {})


def test_a_label_free_refinement_job_is_told_which_check_failed_and_stops_when_they_pass(store_registry, monkeypatch):
    from agent.jobs import run_job, submit_jobs
    from tasks.addition import make_problem, same_sum_twin
    from workers.cache import PolicyCache

    store, registry = store_registry
    # the policy's answers to the split check's halves (21 + 43 split as 1 + 3 and 2 + 4) and to the same-sum twin:
    # right, as a policy that masters them gives them (the untrained v0 does not)
    twin = same_sum_twin(make_problem("12", "34")).prompt
    monkeypatch.setattr("agent.evaluation.greedy_solver", lambda policy, cfg: (
        lambda problems: [{"1+3=": "40", "2+4=": "60", twin: "460"}.get(p.prompt, "00") for p in problems]))
    # the malformed "4+0" lands in the next round's prompt: answers are still read against the problem itself. The
    # rounds are the scripted searches, shown their history as a policy that reads one is (v0 is position-coupled,
    # whose rounds would repair instead: tests/test_refine.py)
    search = _Scripted([("470", None, -1.0), ("4+0", None, -1.0), ("460", None, -2.0), ("never", None, 0.0)])
    monkeypatch.setattr("agent.refine.search_problems", search)
    monkeypatch.setattr("agent.refine.shows_history", lambda policy: True)
    (job,) = submit_jobs(store, [Problem("12+34=", task="addition", id="lf-job", difficulty=2)], rounds=4,
                         search={"strategy": "greedy", "max_new_tokens": 4})
    out = run_job(store, job, PolicyCache(registry).get, "t")
    assert [t["verdict"] for t in out["result"]["tried"]] == [
        "rejected by the split check", "rejected: not an answer of the expected form",
        "passes the split and same_sum checks"]
    assert out["result"]["stopped"] == "accepted" and out["result"]["best"]["completion"] == "460"
    assert search.prompts[2] == ("# attempt: 470\n# feedback: rejected by the split check\n# attempt: 4+0\n"
                                 "# feedback: rejected: not an answer of the expected form\n12+34=")


def test_a_second_delivery_while_the_first_runs_does_not_write_twice(store_registry, tmp_path):
    from workers.cache import PolicyCache
    from agent.jobs import LeaseBusy, run_job, submit_jobs
    from workers.lease import RedisLease
    import redis

    server = RedisServer(tmp_path, appendonly=False).start()
    try:
        client = redis.Redis(port=server.port)
        store, registry = store_registry
        cache = PolicyCache(registry)
        (job,) = submit_jobs(store, [Problem("7+8=", "51", id="u3")], search={"max_new_tokens": 4})
        started = threading.Event()

        def slow_policy():
            started.set()
            time.sleep(1.0)  # the first delivery is mid-job while the second arrives
            return cache.get()

        out = {}
        first = threading.Thread(target=lambda: out.update(a=run_job(store, job, slow_policy, "w1", lease=RedisLease(client, f"lease:{job}", 5))))
        first.start()
        started.wait(10)
        with pytest.raises(LeaseBusy):
            run_job(store, job, cache.get, "w2", lease=RedisLease(client, f"lease:{job}", 5))
        first.join()
        assert out["a"]["status"] == "done" and store.get_job(job).attempts == 1
        assert run_job(store, job, cache.get, "w2", lease=RedisLease(client, f"lease:{job}", 5)) == out["a"]
        assert len(store.trajectories(job_id=job)) == 1 and client.get(f"lease:{job}") is None
    finally:
        server.stop()


def test_a_job_that_keeps_killing_its_worker_gives_up(store_registry):
    from agent.jobs import run_job, submit_jobs

    store, registry = store_registry
    (job,) = submit_jobs(store, [Problem("1+1=", "20", id="u4")])
    for _ in range(2):  # two deliveries that died mid-job (counted, never finished)
        store.start_job(job, "dead")
    out = run_job(store, job, lambda: None, "w", max_deliveries=2)
    assert out["status"] == "failed" and "gave up after 2 deliveries" in out["error"]


def test_a_job_with_rounds_out_of_range_fails_with_a_clear_error(store_registry):
    from agent.jobs import run_job
    from agent.schema import MAX_REFINE_ROUNDS

    store, _ = store_registry
    (pid,) = store.add_problems([Problem("1+1=", "20", id="u5")])
    job = store.create_job("refine", pid, rounds=10**9)  # written past submit (an older version, another tool)
    loads = []
    out = run_job(store, job, lambda: loads.append(1), "w")
    assert out["status"] == "failed" and str(10**9) in out["error"] and f"from 1 to {MAX_REFINE_ROUNDS}" in out["error"]
    assert loads == [] and store.trajectories(job_id=job) == []  # refused before a policy loads or a search runs


# CLI ---------------------------------------------------------------------------------------------------------

def _cli(env: dict, *args):
    from arbor.cli import app

    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture()
def cli_env(home):
    return {"ARBOR_HOME": str(home), "ARBOR_DATABASE_URL": "", "ARBOR_BROKER_URL": "", "ARBOR_DEVICE": "cpu"}


def test_cli_submit_in_process_and_results_json(cli_env, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "21+43=", "answer": "640", "id": "c1"}\n{"prompt": "9+9=", "answer": "81", "id": "c2"}\n')
    res = _cli(cli_env, "submit", str(f), "--refine", "2", "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    ids = [line for line in res.stdout.split() if len(line) == 32]
    assert len(ids) == 2
    rows = {r["job_id"]: r for r in json.loads(_cli(cli_env, "results", "--json").stdout)}
    for job_id in ids:
        r = rows[job_id]
        assert r["status"] == "done" and r["attempts"] == 1 and set(r["best"]) == {"completion", "score", "verified"}
    assert '"status": "done"' in _cli(cli_env, "status", ids[0]).stdout


def test_cli_errors_are_one_clear_line(cli_env, tmp_path, store_registry):
    store, _ = store_registry
    before = len(store.list_jobs())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "20"}\n{"prompt": 3}\nnot json\n{"prompt": "x", "task": "chess"}\n')
    res = _cli(cli_env, "submit", str(bad))
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "bad.jsonl:2: field 'prompt'" in res.output and "bad.jsonl:3: not valid JSON" in res.output
    assert "bad.jsonl:4: field 'task' is 'chess'" in res.output and "nothing was submitted" in res.output
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "answer": "20"}\n')
    down = {**cli_env, "ARBOR_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    res = _cli(down, "submit", str(good))
    assert res.exit_code == 1 and "cannot reach the broker" in res.output and "Traceback" not in res.output
    assert len(store.list_jobs()) == before  # nothing accepted, nothing half-accepted
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    res = _cli(cli_env, "policies", "add", str(not_model))
    assert res.exit_code == 1 and "is not a model folder" in res.output and "Traceback" not in res.output
    res = _cli(cli_env, "worker")
    assert res.exit_code == 1 and "no broker configured" in res.output


def test_cli_policies_add_promotes_a_local_model(cli_env, tmp_path, store_registry):
    from agent.policy import build_builtin_policy

    _, registry = store_registry
    model, tok = build_builtin_policy()
    model.save_pretrained(tmp_path / "mine")
    tok.save_pretrained(tmp_path / "mine")
    res = _cli(cli_env, "policies", "add", str(tmp_path / "mine"))
    assert res.exit_code == 0, res.output
    version = res.stdout.strip().splitlines()[-1]
    assert registry.promoted()[0] == version
    listed = json.loads(_cli(cli_env, "policies", "--json").stdout)
    assert {"version", "path", "status", "metrics"} <= set(listed[0])
    assert [p["version"] for p in listed if p["status"] == "promoted"] == [version]
    registry.promote("v0", {})


def test_never_two_train_cycles_at_once(home, store_registry, monkeypatch):
    from agent.settings import Settings
    from agent.locks import FileLease
    from agent.train_cycle import run_train_cycle

    store, registry = store_registry
    settings = Settings(home=home, device="cpu")
    monkeypatch.setattr("agent.train_cycle.train_from_store", lambda *a, **k: pytest.fail("trained while another cycle ran"))
    running = FileLease(home / "train.lock", holder="cycle-1")
    assert running.acquire()
    try:
        out = run_train_cycle(settings, store, registry, job_id="cycle-2", worker="t")
        assert out == {"skipped": "another train cycle is running"} and store.get_job("cycle-2").status == "done"
        assert run_train_cycle(settings, store, registry, job_id="cycle-2", worker="t") == out  # redelivered: same
    finally:
        running.release()


def test_search_sizes_are_bounded():
    for bad in ({"max_new_tokens": 10**9}, {"n": 10**6}, {"simulations": 10**7}, {"max_rows": 10**8},
                {"temperature": float("nan")}, {"seed": -1}, {"n": True}, {"beams": 10**4, "groups": 1}):
        with pytest.raises(ValueError):
            SearchConfig(**bad)
    SearchConfig(max_new_tokens=32768, n=4096)  # the bounds themselves are allowed


def test_a_job_longer_than_the_models_context_fails_with_a_clear_error(store_registry):
    from agent.jobs import run_job, submit_jobs
    from workers.cache import PolicyCache

    store, registry = store_registry
    cache = PolicyCache(registry)
    context = cache.get().model.config.max_position_embeddings
    (job,) = submit_jobs(store, [Problem("1+2=", "30", id="ctx1")], search={"max_new_tokens": context})
    out = run_job(store, job, cache.get, "t")
    assert out["status"] == "failed" and "exceeds the model's context" in out["error"] and str(context) in out["error"]


def test_a_search_that_runs_out_of_device_memory_is_retried(store_registry, monkeypatch):
    import torch

    from agent.jobs import run_job, submit_jobs
    from workers.cache import PolicyCache
    import agent.refine

    store, registry = store_registry
    real, calls = agent.refine.refine, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr("agent.refine.refine", flaky)
    monkeypatch.setattr("agent.jobs.wait_exponential", lambda **k: (lambda state: 0))
    (job,) = submit_jobs(store, [Problem("4+4=", "80", id="oom1")], search={"max_new_tokens": 4})
    out = run_job(store, job, PolicyCache(registry).get, "t")
    assert out["status"] == "done" and len(calls) == 2


def test_a_promoted_version_that_fails_to_load_is_not_swapped_in(store_registry, caplog):
    import shutil

    from agent.policy import build_builtin_policy
    from workers.cache import PolicyCache

    store, registry = store_registry
    cache = PolicyCache(registry)
    assert cache.get().version == "v0"
    model, tok = build_builtin_policy()
    broken = registry.save(model, tok, parent="v0", trained_on={})
    (registry.root / broken / "model.safetensors").write_bytes(b"not weights")
    registry.promote(broken, {})
    try:
        with caplog.at_level("ERROR", logger="arbor.workers"):
            assert cache.get().version == "v0"  # the held version stays: no half-swapped cache
        assert f"promoted policy {broken} failed to load" in caplog.text
        fresh = PolicyCache(registry)  # a worker that holds nothing yet: the previously promoted version
        assert fresh.get().version == "v0"
    finally:
        registry.promote("v0", {})
        shutil.rmtree(registry.root / broken, ignore_errors=True)


def test_refine_many_searches_the_unsolved_problems_of_each_round_in_one_batch(monkeypatch):
    from agent.refine import refine_many

    calls = []

    def solve(problems, policy, cfg):  # p1 passes in round 0, p2 in round 2, p3 never
        calls.append([p.id for p in problems])
        passes = {("p1", 0), ("p2", 2)}
        r = len(calls) - 1
        return [SearchResult(p, [_cand(f"{p.id}-{r}", (p.id, r) in passes, -1.0)], "greedy", "v0") for p in problems]

    monkeypatch.setattr("agent.refine.search_problems", solve)
    problems = [Problem(f"{i}=", "x", id=f"p{i}") for i in (1, 2, 3)]
    results = refine_many(problems, policy=None, cfg=SearchConfig(), rounds=4)
    assert calls == [["p1", "p2", "p3"], ["p2", "p3"], ["p2", "p3"], ["p3"]]
    assert [len(r) for r in results] == [1, 3, 4]
    assert results[1][2].result.problem.prompt.count("# attempt: ") == 2 and results[1][2].best.verified
