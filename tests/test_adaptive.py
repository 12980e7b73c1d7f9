"""Adaptive search: greedy first; repairs, best-of-N and MCTS only for the problems whose answer the scorer does not
trust; every stage's spending and reason recorded; the threshold calibrated from held-out verdicts; refused without
one."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.config import BuiltinConfig, TrainConfig
from agent.trainer import SFTFineTuner
from agent.policy import Policy, build_builtin_policy
from search import SearchConfig, run_search
from search.calibration import calibrate_accept_score
from tasks import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPAIRS = ["repair_1", "repair_2", "repair_3"]
CFG = dict(strategy="adaptive", scorer="mean_logprob", n=8, simulations=3, children=2, max_new_tokens=6, repairs=3)


@pytest.fixture(scope="module")
def policy():
    model, tok = build_builtin_policy(BuiltinConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                                                    seed=4))
    # a few steps on short sums: answers finish, some right and confident, some not
    examples = [{"prompt": p.prompt, "completion": p.answer} for d in (1, 2) for p in get_task("addition").generate(d, 256, seed=0)]
    SFTFineTuner(TrainConfig(learning_rate=3e-3, max_steps=300, batch_size=32, time_budget_s=300)).train(model, tok, examples)
    return Policy(model.eval(), tok, "v")


PROBLEMS = get_task("addition").generate(2, 10, seed=1)


def test_trusted_greedy_answers_stop_there_and_untrusted_ones_escalate(policy):
    greedy = run_search(PROBLEMS, SearchConfig(strategy="greedy", max_new_tokens=6), policy)
    scores = sorted(r.best.mean_logprob for r in greedy if r.best.finished)
    assert len(scores) >= 4
    threshold = scores[len(scores) // 2]  # half the problems trust their greedy answer
    results = run_search(PROBLEMS, SearchConfig(**CFG, accept_score=threshold), policy)
    for g, r in zip(greedy, results):
        assert r.strategy == "adaptive" and r.problem is g.problem
        first = r.stages[0]
        assert first["stage"] == "greedy" and first["tokens"] == g.generated_tokens
        assert first["best_score"] is None if not g.best.finished else abs(first["best_score"] - g.best.mean_logprob) < 1e-3
        if g.best.finished and g.best.mean_logprob >= threshold:  # kept: greedy's cost and answer, nothing more
            assert [s["stage"] for s in r.stages] == ["greedy"] and first["why"].startswith("kept")
            assert r.generated_tokens == g.generated_tokens and r.best.token_ids == g.best.token_ids
        else:
            assert [s["stage"] for s in r.stages][:2] == ["greedy", "repair_1"]  # a repair first
            assert first["why"].startswith("escalated")
            assert r.generated_tokens == sum(s["tokens"] for s in r.stages) > g.generated_tokens
            # the greedy answer stays a candidate: a later stage can only find a better-scored one
            assert any(c.token_ids == g.best.token_ids for c in r.candidates)
            assert r.best.score >= g.best.mean_logprob - 1e-6
    assert 0 < sum(len(r.stages) == 1 for r in results) < len(results)


def test_samples_come_in_doubling_steps_that_add_up_to_n():
    from search.adaptive import sample_sizes

    assert sample_sizes(16) == [2, 4, 10]
    assert sample_sizes(8) == [2, 6]
    assert sample_sizes(32) == [2, 4, 8, 18]
    assert sample_sizes(4) == [4] and sample_sizes(1) == [1]


def test_an_unreachable_threshold_runs_every_stage_and_says_so(policy):
    results = run_search(PROBLEMS[:3], SearchConfig(**CFG, accept_score=1.0), policy)  # mean log-prob <= 0
    for r in results:
        assert [s["stage"] for s in r.stages] == ["greedy", *REPAIRS, "best_of_2", "best_of_8", "mcts"]
        assert r.stages[-1]["why"].startswith("last stage")
        assert r.forward_passes == sum(s["forward_passes"] for s in r.stages)


def test_without_a_threshold_or_a_calibrated_value_model_adaptive_is_refused_in_one_line(policy):
    with pytest.raises(ValueError, match="adaptive search needs accept_score") as exc:
        run_search(PROBLEMS[:1], SearchConfig(**CFG), policy)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="accept_score must be a finite number"):
        SearchConfig(**CFG, accept_score=float("nan"))


def test_calibration_picks_the_lowest_threshold_at_the_precision():
    scores, right = [0.9, 0.8, 0.7, 0.6, 0.5], [True, True, False, True, False]
    assert calibrate_accept_score(scores, right, precision=0.95) == 0.8
    assert calibrate_accept_score(scores, right, precision=0.75) == 0.6
    assert calibrate_accept_score(scores, right, precision=0.5) == 0.5
    assert calibrate_accept_score([0.9, 0.9, 0.1], [True, False, True], precision=0.95) is None  # a tie is one cut


def test_a_queue_job_with_adaptive_search_reports_what_it_spent_and_why(tmp_path, policy):
    from agent.jobs import run_job, submit_jobs
    from agent.registry import PolicyRegistry
    from agent.store import Store
    from tasks import Problem
    from workers.cache import PolicyCache

    store = Store(f"sqlite:///{tmp_path / 'arbor.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    registry.promote(registry.save(policy.model, policy.tokenizer, parent=None, trained_on={}), {})
    search = {**CFG, "accept_score": 1.0}  # never trusted: every stage runs
    (job,) = submit_jobs(store, [Problem("4+5=", answer="9", id="adaptive-job")], search=search)
    out = run_job(store, job, PolicyCache(registry).get, "t")
    assert out["status"] == "done", out
    (round0,) = out["result"]["tried"]
    assert [s["stage"] for s in round0["stages"]] == ["greedy", *REPAIRS, "best_of_2", "best_of_8", "mcts"]
    assert [s["why"].split(":")[0] for s in round0["stages"]] == ["escalated"] * 6 + ["last stage"]
    assert out["result"]["spent"]["tokens"] == round0["tokens"] == sum(s["tokens"] for s in round0["stages"])


@pytest.fixture(scope="module")
def judged(policy):
    """A value model trained on the policy's own labelled samples of train problems, calibrated on held-out ones."""
    from agent.value import ValueConfig, train_value
    from search.calibration import calibrate

    res = run_search(get_task("addition").generate(1, 60, seed=11),
                     SearchConfig(strategy="best_of_n", n=6, temperature=1.0, max_new_tokens=6), policy)
    # its finished samples, and each problem's right answer as the loop's accepted label would add it
    labelled = [{"prompt": r.problem.prompt, "completion": c.completion, "label": bool(c.verified)}
                for r in res for c in r.candidates if c.finished]
    labelled += [{"prompt": r.problem.prompt, "completion": r.problem.answer, "label": True} for r in res]
    value_model = train_value(policy, labelled, ValueConfig(trunk="frozen", epochs=30, time_budget_s=30))
    report = calibrate(value_model, policy, get_task("addition").generate(1, 40, seed=12, split="heldout"),
                       precision=0.8)
    return value_model, report


def test_calibration_sets_the_threshold_the_version_keeps(judged):
    value_model, report = judged
    assert report["problems"] == 40 and report["accept_score"] is not None, report
    assert value_model.accept_score == report["accept_score"] and 0 < report["kept_share"] <= 1


def test_calibration_reuses_greedy_answers_it_is_given_and_decodes_only_the_rest(policy, judged):
    """The loop calibrates on the held-out answers its gate already decoded: given answers are scored as they are
    (here every one marked wrong, which no decoding would give), and only problems without one are decoded."""
    import copy

    from search.calibration import calibrate

    value_model = copy.deepcopy(judged[0])
    problems = get_task("addition").generate(1, 40, seed=12, split="heldout")
    decoded = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=6), policy)
    assert sum(bool(r.best.verified) for r in decoded) > 10  # the policy adds 1 digit: most of its answers are right
    all_wrong = {r.problem.id: replace(r.best, verified=False) for r in decoded}
    given = calibrate(value_model, policy, problems, precision=0.8, max_new_tokens=6, greedy=all_wrong)
    assert given["greedy_accuracy"] == 0.0 and given["accept_score"] is None
    half = dict(list(all_wrong.items())[:20])  # the other 20 decoded here, as before
    mixed = calibrate(value_model, policy, problems, precision=0.8, max_new_tokens=6, greedy=half)
    assert mixed["greedy_accuracy"] == pytest.approx(sum(bool(r.best.verified) for r in decoded[20:]) / 40)


def test_auto_is_beam_without_a_calibrated_value_model_and_adaptive_with_one(policy, judged, tmp_path):
    from dataclasses import replace

    from agent.registry import PolicyRegistry, save_value
    from agent.store import Store
    from arbor.submission import JOB_SEARCH
    from workers.cache import PolicyCache

    assert JOB_SEARCH.strategy == "auto"
    cfg = SearchConfig(strategy="auto", beams=2, n=8, simulations=3, children=2, max_new_tokens=6)
    plain = run_search(PROBLEMS[:4], cfg, policy)
    beam = run_search(PROBLEMS[:4], replace(cfg, strategy="beam"), policy)
    assert [r.strategy for r in plain] == ["beam"] * 4
    assert [r.best.token_ids for r in plain] == [r.best.token_ids for r in beam]

    # the version with its calibrated value model, as a worker loads it: auto is now adaptive, by the value
    value_model, report = judged
    registry = PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))
    version = registry.save(policy.model, policy.tokenizer, parent=None, trained_on={})
    save_value(registry, version, value_model)
    registry.promote(version, {})
    served = PolicyCache(registry).get()
    assert served.value_model.accept_score == report["accept_score"]
    results = run_search(PROBLEMS[:4], cfg, served)
    assert [r.strategy for r in results] == ["adaptive"] * 4
    assert all(r.stages and r.stages[0]["accept_score"] == report["accept_score"] for r in results)


def test_replayed_adaptive_search_stops_where_its_scores_say():
    from search.calibration import replay_adaptive, running_best

    # two problems; stages: greedy, samples, samples, mcts; (tokens, [(value, right)])
    runs = [[(5, [(0.2, False)]), (5, [(0.95, True)])],
            [(10, [(0.1, False), (0.3, True)]), (10, [])],
            [(20, [(0.9, True)]), (20, [])],
            [(8, [(0.5, False)]), (8, [])]]
    paths = running_best(runs)
    assert paths[0] == [(5, 0.2, False), (15, 0.3, True), (35, 0.9, True), (43, 0.9, True)]
    assert paths[1][0] == (5, 0.95, True)
    sampling = [1, 2]
    # accept 0.8: the first problem stops after the second sampling stage, the second at greedy
    assert replay_adaptive(paths, sampling, 0.8, None) == (1.0, (35 + 5) / 2)
    # giving up under 0.5 after a sampling stage: the first stops after its first samples, right by luck
    assert replay_adaptive(paths, sampling, 0.8, 0.5) == (1.0, (15 + 5) / 2)
    # never trusted, never given up: every stage runs and the best so far is kept
    assert replay_adaptive(paths, sampling, 2.0, None) == (1.0, (43 + 43) / 2)


def test_a_budget_calibration_stores_both_scores_and_adaptive_gives_up_by_them(policy, judged):
    import copy

    from search.calibration import calibrate

    value_model, _ = judged
    value_model = copy.copy(value_model)
    value_model.meta = dict(value_model.meta)
    cfg = SearchConfig(strategy="adaptive", n=8, temperature=1.0, simulations=2, children=2, max_new_tokens=6)
    report = calibrate(
        value_model, policy, get_task("addition").generate(1, 30, seed=14, split="heldout"), budget_share=0.5,
        cfg=cfg, max_new_tokens=6)
    assert report["rule"] == "budget" and report["problems"] == 30
    assert value_model.meta["accept_score"] == report["accept_score"]
    assert value_model.meta["give_up_score"] == report["give_up_score"]
    assert report["within_budget"] == (report["replayed_tokens"] <= 0.5 * report["best_of_n_tokens"])
    # a give-up score above every value: each escalated problem stops after its first samples, and says why
    results = run_search(PROBLEMS[:4], SearchConfig(strategy="adaptive", n=8, temperature=1.0, max_new_tokens=6,
                                                    scorer="mean_logprob", accept_score=1.0, give_up_score=1.0), policy)
    for r in results:
        assert [s["stage"] for s in r.stages] == ["greedy", "repair_1"]  # a repair is an escalation like samples
        assert r.stages[-1]["why"].startswith("gave up")
    no_repairs = run_search(PROBLEMS[:4], SearchConfig(strategy="adaptive", n=8, temperature=1.0, max_new_tokens=6,
                                                       scorer="mean_logprob", accept_score=1.0, give_up_score=1.0,
                                                       repairs=0), policy)
    assert all([s["stage"] for s in r.stages] == ["greedy", "best_of_2"] for r in no_repairs)


def test_repair_stages_change_the_greedy_answer_at_its_least_confident_tokens_in_turn(policy):
    from search.repair import branch_points, repair

    greedy = run_search(PROBLEMS[:4], SearchConfig(strategy="greedy", max_new_tokens=6), policy)
    results = run_search(PROBLEMS[:4], SearchConfig(strategy="adaptive", scorer="mean_logprob", accept_score=1.0,
                                                    repairs=2, n=2, simulations=1, max_new_tokens=6), policy)
    branches = branch_points(policy, PROBLEMS[:4], [g.best for g in greedy])
    for k in (1, 2):
        expected = repair(policy, PROBLEMS[:4], [b[k - 1] for b in branches], 6)
        for r, e, b in zip(results, expected, branches):
            stage = r.stages[k]
            assert stage["stage"] == f"repair_{k}"
            # a repair decodes only what follows its change: the answer's tokens before it are reused
            assert stage["tokens"] == e.generated_tokens <= len(e.best.token_ids) - b[k - 1].position
            assert any(c.token_ids == e.best.token_ids for c in r.candidates)
    assert all(b[0].margin <= b[1].margin for b in branches)
