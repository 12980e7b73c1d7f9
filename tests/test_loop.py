"""The loop on a tiny budget: it really trains, records, promotes, and its gate rejects a worse candidate."""

import time
from dataclasses import asdict, replace

import pytest
import torch

from agent.curriculum import BuiltinSource
from agent.config import LoopConfig, WarmStartConfig
from agent.loop import SelfImprovementLoop
from agent.warm_start import ensure_policy, warm_start_examples
from agent.config import BuiltinConfig
from agent.registry import PolicyRegistry
from agent.config import SelectConfig
from agent.settings import Settings
from agent.run_store import RunStore
from agent.store import Store
from tasks import get_task
from agent.config import TrainConfig
from search import SearchConfig


def tiny_config(**changes) -> LoopConfig:
    cfg = LoopConfig(
        cycles=1,
        builtin=BuiltinConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4),  # 4x cheaper, same code
        problems_per_cycle=64,
        heldout_per_difficulty=24,
        report_difficulties=(3,),
        eval_ahead=1,
        max_difficulty=4,
        examples_per_cycle=600,
        search=SearchConfig(strategy="best_of_n", n=4, temperature=1.0),
        select=SelectConfig(mode="verifier"),
        train=TrainConfig(learning_rate=2e-3, time_budget_s=120.0, max_steps=40),
        # a deliberately short warm start, not extended: a cycle must have something left to improve
        warm_start=WarmStartConfig(difficulties=(1, 2), examples_per_difficulty=800, mastery=None,
                                   train=TrainConfig(learning_rate=3e-3, time_budget_s=120.0, max_steps=120, schedule="time_cosine")),
    )
    return replace(cfg, **changes)


@pytest.fixture()
def setup(tmp_path):
    settings = Settings(home=tmp_path / "home", device="cpu")
    store = Store(settings.db_url)
    registry = PolicyRegistry(settings.policies_dir, store)
    return settings, store, registry


def _loop(cfg, store, registry):
    task = get_task("addition")
    source = BuiltinSource(task, cfg.heldout_per_difficulty, cfg.max_difficulty, cfg.seed)
    return SelfImprovementLoop(cfg, store, registry, source, warm_start_examples(task, cfg.warm_start, cfg.seed))


def _run(cfg, store, registry, base: str, name: str = "test") -> list:
    """A run from `base` in the store, as agent/runner.py starts one, run to its end."""
    runs = RunStore(store)
    runs.create(name, asdict(cfg), {})
    runs.set_base(name, base, promote=False)
    return _loop(cfg, store, registry).run(name, time.monotonic())


def test_tiny_loop_trains_and_promotes(setup):
    settings, store, registry = setup
    cfg = tiny_config()
    v0 = ensure_policy(settings, registry, cfg)
    before = registry.load(v0).model.state_dict()
    records = _run(cfg, store, registry, v0)
    assert [r.cycle for r in records] == [0, 1]
    first, second = records
    assert first.policy_version == v0 and first.candidate is None
    assert second.candidate == "v1" and second.accepted > 0 and second.train["steps"] > 0
    # a position-coupled policy is shown no refinement history (agent/refine.py shows_history): nothing to learn there
    assert first.refinement_examples == 0 and second.refinement_examples == 0
    # best-of-n generates at least one token per sample; nothing is searched before the first cycle
    assert first.search_tokens == 0 and second.search_tokens >= cfg.problems_per_cycle * cfg.search.n
    rows = {r.version: r for r in store.policies()}
    assert rows["v1"].parent == v0 and "gate_score" in rows["v1"].metrics and rows["v1"].trained_on["examples"] > 0
    after = registry.load("v1").model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the candidate's weights really changed
    assert second.promoted == (rows["v1"].status == "promoted")
    assert second.promoted, f"a verified fine-tune should beat the 8-second warm start: {second.gate}"
    assert registry.promoted()[0] == "v1"
    best = store.trajectories(cycle=1, best_only=True)
    assert len(best) == cfg.problems_per_cycle and all(t.policy_version == v0 for t in best)


def test_gate_rejects_a_worse_candidate(setup):
    settings, store, registry = setup
    cfg = tiny_config()
    v0 = ensure_policy(settings, registry, cfg)
    # a learning rate this large wrecks the weights: the candidate must lose to the current policy
    broken = replace(cfg, train=TrainConfig(learning_rate=5.0, time_budget_s=2.0, max_steps=5))
    records = _run(broken, store, registry, v0)
    assert records[1].candidate == "v1" and not records[1].promoted
    assert records[1].gate["candidate"] < records[1].gate["current"]
    # the record, the report and the console line say which lengths fell, and from what to what
    fell = records[1].gate["fell"]
    assert fell and all(f["after"] < f["before"] for f in fell.values())
    assert set(fell) <= set(records[1].heldout) and all(fell[k]["before"] == records[0].heldout[k] for k in fell)
    from agent.report import write_report
    from arbor.commands.run import _cycle_row

    worst = min(fell, key=lambda k: fell[k]["after"] - fell[k]["before"])
    shown = f"{worst} {fell[worst]['before']:.2f}->{fell[worst]['after']:.2f}"
    assert _cycle_row(records[1])[-1].startswith("no, fell: ") and shown in _cycle_row(records[1])[-1]
    write_report(settings.home / "report", records, v0, {})
    text = (settings.home / "report" / "report.md").read_text()
    assert "Rejected candidates" in text and shown in next(line for line in text.splitlines()
                                                            if line.startswith("- cycle 1: "))
    assert registry.promoted()[0] == v0
    assert {r.version: r.status for r in store.policies()} == {"v0": "promoted", "v1": "rejected"}


def test_a_files_problems_are_grouped_by_difficulty_meta_or_prompt_length():
    from agent.curriculum import FileSource
    from tasks import Problem, Task

    top = FileSource([Problem("a", id="1", difficulty=2), Problem("b", id="2", meta={"difficulty": 1})], Task())
    assert top.grouping == "difficulty" and top.difficulties() == ["1", "2"]
    bad_meta = [Problem("x" * n, id=str(n), meta={"difficulty": "hard"}) for n in (1, 1, 2, 4, 4, 9, 9, 9, 16, 30)]
    by_length = FileSource(bad_meta, Task())
    assert by_length.grouping == "prompt length" and by_length.difficulties() == ["1", "4", "9", "30"]  # about equal groups
    assert by_length.heldout_set(["9"]) == {} and len(by_length.train_problems("9", 10, seed=0)) == 3


def test_support_weighs_distinct_tree_candidates_by_probability_and_counts_samples():
    from agent.config import SelectConfig
    from agent.select import answer_support, select
    from search import Candidate, SearchResult
    from tasks import Problem, Task

    def cand(text, logprobs):
        return Candidate(text, token_ids=list(range(len(logprobs))), mean_logprob=sum(logprobs) / len(logprobs),
                         min_logprob=min(logprobs), mean_entropy=0.0, finished=True, logprobs=logprobs)

    problem = Problem("q", "42", id="q")
    # a beam's distinct candidates: "42" is far more probable, though it is one completion of three
    beam = SearchResult(problem, [cand("42", [-0.05, -0.05]), cand("41", [-3.0, -2.0]), cand("24", [-4.0, -3.0])], "beam", "v0")
    support = answer_support(beam, Task())
    assert support["42"] > 0.98 and abs(sum(support.values()) - 1) < 1e-9
    # samples with repeats are counted, whatever their probability
    samples = SearchResult(problem, [cand("41", [-3.0]), cand("41", [-3.0]), cand("42", [-0.1]), cand("41", [-3.0])], "best_of_n", "v0")
    assert answer_support(samples, Task()) == {"41": 0.75, "42": 0.25}
    # diverse beam's groups may return one completion twice: it still counts once, by its probability
    diverse = SearchResult(problem, [cand("42", [-0.05, -0.05]), cand("41", [-3.0, -2.0]), cand("42", [-0.05, -0.05])],
                           "diverse_beam", "v0")
    assert answer_support(diverse, Task()) == answer_support(
        SearchResult(problem, diverse.candidates[:2], "diverse_beam", "v0"), Task())
    assert answer_support(diverse, Task())["42"] > 0.98
    # label-free selection keeps the tree's label now; a count (1/3) would have dropped it
    chosen = select([beam], Task(), SelectConfig(min_vote_share=0.75), solve=lambda ps: [])
    assert [e["completion"] for e in chosen.examples] == ["42"]


def test_verifier_mode_trains_on_the_given_answer_where_no_candidate_verified():
    from agent.config import SelectConfig
    from agent.select import select
    from search import Candidate, SearchResult
    from tasks import Problem, Task, verify

    def result(problem, *texts):
        cands = [Candidate(t, token_ids=[1], mean_logprob=-0.1 * i, min_logprob=-0.1 * i, mean_entropy=0.0, finished=True,
                           verified=verify(problem, t)) for i, t in enumerate(texts)]
        return SearchResult(problem, cands, "best_of_n", "v0")

    solved = Problem("a=", "x", id="a")
    unsolved = Problem("b=", "y", id="b")
    pattern = Problem("c=", "[0-9]+", checker="regex", id="c")  # a regex answer is a test, never a text to train on
    results = [result(solved, "z", "x"), result(unsolved, "z", "w"), result(pattern, "q")]
    chosen = select(results, Task(), SelectConfig(mode="verifier"), solve=lambda ps: [])
    assert {e["problem_id"]: e["completion"] for e in chosen.examples} == {"a": "x", "b": "y"}
    assert [(f["name"], f["kept"]) for f in chosen.filters] == [("verifier", 1), ("given_answer", 2)]
    only_searched = select(results, Task(), SelectConfig(mode="verifier", given_answers=False), solve=lambda ps: [])
    assert [e["problem_id"] for e in only_searched.examples] == ["a"]


def test_tasks_without_checks_keep_labels_as_confident_as_mastered_answers():
    from agent.config import SelectConfig
    from agent.select import calibrated_floor, select
    from search import Candidate, SearchResult
    from tasks import Problem, Task, get_task

    def result(problem, text, logprob):
        cands = [Candidate(text, token_ids=[1], mean_logprob=logprob, min_logprob=logprob, mean_entropy=0.0, finished=True)
                 for _ in range(4)]  # unanimous: vote share keeps every one
        return SearchResult(problem, cands, "best_of_n", "v0")

    mastered = [-0.01 * i for i in range(1, 101)]  # greedy confidences where the policy is at least 90% right
    assert calibrated_floor(mastered, 0.1) == pytest.approx(-0.90) and calibrated_floor([], 0.1) is None
    results = [result(Problem("a", "x", id="a"), "x", -0.05),  # as confident as right answers
               result(Problem("b", "y", id="b"), "z", -2.0),  # a unanimous, unconfident mistake
               result(Problem("c", "w", id="c"), "w", -1.5)]  # right, but no more confident than the mistake
    chosen = select(results, Task(), SelectConfig(), solve=lambda ps: [], mastered_confidences=mastered)
    assert [e["problem_id"] for e in chosen.examples] == ["a"]
    assert [f["name"] for f in chosen.filters] == ["format", "vote_share", "calibrated_confidence"]
    assert chosen.filters[1]["precision"] == 2 / 3 and chosen.filters[2]["precision"] == 1.0  # measured each cycle
    # before anything is mastered, and for tasks with checks of their own, the filter stays off
    assert [f["name"] for f in select(results, Task(), SelectConfig(), solve=lambda ps: []).filters] == ["format", "vote_share"]
    addition = select([], get_task("addition"), SelectConfig(), solve=lambda ps: [], mastered_confidences=mastered)
    assert "calibrated_confidence" not in [f["name"] for f in addition.filters]


def test_the_gate_and_curriculum_judge_the_reported_easier_difficulties_too(setup):
    """Past the window below the frontier, the report's difficulties still count: a candidate that forgot them
    is caught, and the curriculum goes back to them rather than keeping an old "mastered"."""
    settings, store, registry = setup
    cfg = tiny_config(max_difficulty=40, report_difficulties=(4, 8, 40), eval_ahead=3, frontier_stride=0.2)
    loop = _loop(cfg, store, registry)
    loop.curriculum.update({str(d): 1.0 for d in range(1, 20)})  # frontier at 20: window 17..(20 + 2 * 4)
    assert loop.curriculum.key(loop.curriculum.frontier_index) == "20"
    assert loop.plan.gate_keys(loop.curriculum.frontier_index) == ["4", "8"] + [str(d) for d in range(17, 29)]
    loop.curriculum.update({"8": 0.5})  # forgotten: the frontier goes back
    assert loop.curriculum.key(loop.curriculum.frontier_index) == "8"


def test_report_difficulties_past_the_window_are_scored_on_a_sample(setup):
    _, store, registry = setup
    cfg = tiny_config(max_difficulty=40, report_difficulties=(4, 8, 40), eval_ahead=3, frontier_stride=0.2,
                      heldout_per_difficulty=40, heldout_past_window=10, full_heldout_ahead=None)
    loop = _loop(cfg, store, registry)
    loop.curriculum.update({str(d): 1.0 for d in range(1, 20)})  # frontier 20: window 17..28
    heldout = loop.plan.heldout_problems(loop.curriculum.frontier_index)
    assert {k: len(v) for k, v in heldout.items()} == {"4": 40, "8": 40, **{str(d): 40 for d in range(17, 29)}, "40": 10}
    assert heldout["40"] == loop.source.heldout_set(["40"])["40"][:10]  # the same problems every cycle
    everything = _loop(replace(cfg, heldout_past_window=None), store, registry)
    everything.curriculum.update({str(d): 1.0 for d in range(1, 20)})
    assert len(everything.plan.heldout_problems(everything.curriculum.frontier_index)["40"]) == 40
    # by default the window's far end is sampled too: the frontier and three past it keep all their problems
    near = _loop(replace(cfg, full_heldout_ahead=LoopConfig().full_heldout_ahead), store, registry)
    near.curriculum.update({str(d): 1.0 for d in range(1, 20)})
    sizes = {k: len(v) for k, v in near.plan.heldout_problems(near.curriculum.frontier_index).items()}
    assert sizes == {"4": 40, "8": 40, **{str(d): 40 for d in range(17, 24)}, **{str(d): 10 for d in range(24, 29)},
                     "40": 10}
    assert near.plan.gate_keys(near.curriculum.frontier_index) == loop.plan.gate_keys(loop.curriculum.frontier_index)


def test_the_gate_evaluates_the_current_policy_only_where_the_scores_compare(setup, monkeypatch):
    """The current policy's evaluation carries over between cycles: the gate evaluates it again only at gate keys it
    has no score for, never at report-only difficulties (the candidate is evaluated everywhere)."""
    import agent.gate
    from agent.evaluation import Evaluation
    from agent.gate import judge, train_candidate
    from agent.policy import Policy

    settings, store, registry = setup
    cfg = tiny_config(train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=1))
    v0 = ensure_policy(settings, registry, cfg)
    current = registry.load(v0, "cpu")
    task = get_task("addition")
    heldout = {str(d): task.generate(d, 6, seed=0, split="heldout") for d in (2, 3, 4)}
    calls, real = [], agent.gate.evaluate_policy
    monkeypatch.setattr(agent.gate, "evaluate_policy",
                        lambda policy, by, *a, **k: calls.append((policy.version, {key: len(ps) for key, ps in by.items()}))
                        or real(policy, by, *a, **k))
    current_eval = Evaluation("label_free", {"2": 1.0, "3": 0.5, "4": 0.0}, {"2": 1.0})
    examples = [{"prompt": p.prompt, "completion": p.answer} for p in task.generate(2, 8, seed=1)]
    model, _ = train_candidate(current, examples, [], cfg.train, "sft", cfg.preference)
    verdict = judge(Policy(model, current.tokenizer, "candidate"), current, heldout, cfg.eval_search, task, "label_free",
                    0.0, ["2", "3"], current_eval)
    assert calls == [("candidate", {"2": 6, "3": 6, "4": 6}), (v0, {"3": 6})]
    assert verdict.keys == ["2", "3"] and set(verdict.current.self_verified) == {"2", "3"}
    assert current_eval.self_verified == {"2": 1.0}  # the caller's evaluation is not changed in place
    # a length new to the current policy scored on a sample of its problems: the same first ones, the candidate's all
    calls.clear()
    sampled = judge(Policy(model, current.tokenizer, "candidate"), current, heldout, cfg.eval_search, task,
                    "label_free", 0.0, ["2", "3"], current_eval, current_sample=2)
    assert calls == [("candidate", {"2": 6, "3": 6, "4": 6}), (v0, {"3": 2})]
    assert sampled.current.self_verified["3"] in (0.0, 0.5, 1.0)
    assert sampled.candidate.metric == verdict.candidate.metric  # greedy: the candidate's scores do not change


def test_a_minority_answer_that_passes_the_task_checks_is_the_label():
    """Addition's split check decides among a problem's sampled answers: the majority's systematic mistake fails it,
    the one right sample passes, and each half is solved once however many answers are checked."""
    from agent.config import SelectConfig
    from agent.select import select
    from search import Candidate, SearchResult
    from tasks import get_task
    from tasks.addition import make_problem, same_sum_twin

    addition = get_task("addition")
    problem = make_problem("1234", "5678")  # least significant digit first
    right = problem.answer
    wrong = right[:-1] + str((int(right[-1]) + 1) % 10)

    def samples(*texts):
        cands = [Candidate(t, token_ids=[1], mean_logprob=-0.1, min_logprob=-0.1, mean_entropy=0.0, finished=True) for t in texts]
        return SearchResult(problem, cands, "best_of_n", "v0")

    asked = []

    def solve(problems):  # an oracle on the halves: what a policy that masters the shorter lengths answers
        asked.extend(p.prompt for p in problems)
        return [p.answer for p in problems]

    result = samples(wrong, wrong, wrong, right)
    chosen = select([result], addition, SelectConfig(checked_min_share=0.25), solve)
    assert [e["completion"] for e in chosen.examples] == [right]
    assert [(f["name"], f["kept"], f["precision"]) for f in chosen.filters] == [
        ("format", 1, 0.0), ("vote_share", 1, 0.0), ("split", 1, 1.0), ("same_sum", 1, 1.0),
        ("proposed", 1, 1.0)]
    # the two halves, once for both answers, then the same-sum twin of the one answer that passed them
    assert len(asked) == len(set(asked)) == 3 and asked[-1] == same_sum_twin(problem).prompt
    # the majority answer alone (the default) loses the problem to the checks (the proposals are tested on their own)
    assert select([result], addition, SelectConfig(use_task_proposals=False), solve).examples == []
    # an answer below the contender share is never checked
    assert select([result], addition, SelectConfig(checked_min_share=0.5, use_task_proposals=False), solve).examples == []


def test_a_problem_the_search_gets_wrong_is_labelled_where_both_decompositions_agree():
    """A unanimous mistake fails the split check; the task's two decompositions, solved by a policy that masters the
    shorter lengths, both write the right answer, which becomes the label. Where one decomposition's sub-problem is
    answered wrongly they disagree and the problem stays unlabelled."""
    from agent.config import SelectConfig
    from agent.select import select
    from search import Candidate, SearchResult
    from tasks.addition import make_problem

    addition = get_task("addition")
    problem = make_problem("99999", "10000")  # least significant digit first: the low halves carry
    right = problem.answer
    wrong = right[:-2] + "10"

    def samples(*texts):
        cands = [Candidate(t, token_ids=[1], mean_logprob=-0.1, min_logprob=-0.1, mean_entropy=0.0, finished=True) for t in texts]
        return SearchResult(problem, cands, "best_of_n", "v0")

    def masters_shorter(problems):
        assert all(p.difficulty < problem.difficulty for p in problems)  # sub-problems only
        return [p.answer for p in problems]

    chosen = select([samples(wrong, wrong, wrong, wrong)], addition, SelectConfig(), masters_shorter)
    assert [e["completion"] for e in chosen.examples] == [right]
    proposed = chosen.filters[-1]
    assert (proposed["name"], proposed["kept"], proposed["added"], proposed["added_precision"]) == ("proposed", 1, 1, 1.0)
    assert chosen.filters[-2]["kept"] == 0  # the split check had dropped it

    def errs_on_three_digits(problems):  # the 2 + 3 split goes wrong; the 3 + 2 split does not see a 3-digit sum
        return [p.answer if p.difficulty != 3 else p.answer[::-1] for p in problems]

    assert select([samples(wrong, wrong, wrong, wrong)], addition, SelectConfig(), errs_on_three_digits).examples == []
    assert select([samples(wrong, wrong, wrong, wrong)], addition, SelectConfig(use_task_proposals=False),
                  masters_shorter).examples == []
    # unchecked, the policy's answers write labels only at lengths it masters to proposal_mastery, from the easiest up
    unchecked = SelectConfig(verify_proposal_parts=False)
    mastered = {"1": 1.0, "2": 0.99, "3": 0.985}
    assert select([samples(wrong, wrong, wrong, wrong)], addition, unchecked, masters_shorter,
                  gate_metric=mastered).examples[0]["completion"] == right
    assert select([samples(wrong, wrong, wrong, wrong)], addition, unchecked, masters_shorter,
                  gate_metric={**mastered, "2": 0.95}).examples == []  # 3 digits' older value is not trusted past it
    assert select([samples(wrong, wrong, wrong, wrong)], addition, replace(unchecked, proposal_mastery=0.99),
                  masters_shorter, gate_metric=mastered).examples == []
    # by default a part past the trusted lengths counts where the split check, its halves checked alike, holds
    assert select([samples(wrong, wrong, wrong, wrong)], addition, SelectConfig(), masters_shorter,
                  gate_metric={**mastered, "2": 0.95}).examples[0]["completion"] == right
    assert select([samples(wrong, wrong, wrong, wrong)], addition, SelectConfig(), errs_on_three_digits,
                  gate_metric={"1": 1.0, "2": 0.95}).examples == []  # the wrong 3-digit sums fail their own halves
    # a trusted length's parts pass the task's checks one level deep: a wrong 3-digit part fails against its halves
    assert select([samples(wrong, wrong, wrong, wrong)], addition, SelectConfig(), errs_on_three_digits,
                  gate_metric=mastered).examples == []
    # one level, not all the way down as with no bar (proposal_mastery unset): fewer sub-problems asked
    asked_with = {}
    for bar in (SelectConfig().proposal_mastery, None):
        asked = asked_with.setdefault(bar, [])
        chosen = select([samples(wrong, wrong, wrong, wrong)], addition, replace(SelectConfig(), proposal_mastery=bar),
                        lambda ps: asked.extend(p.prompt for p in ps) or masters_shorter(ps), gate_metric=mastered)
        assert chosen.examples[0]["completion"] == right
    assert set(asked_with[SelectConfig().proposal_mastery]) < set(asked_with[None])


def test_verified_past_checks_every_level_of_a_decomposition_down_to_the_trusted_lengths():
    """An answer past the trusted length stands only where its halves compose to it and each half, if itself past
    that length, passes the same check: one wrong quarter-length answer sinks the 8-digit answer built on it."""
    from agent.proposals import verified_past
    from tasks import Task
    from tasks.addition import make_problem

    addition = get_task("addition")
    problem = make_problem("12345678", "87654321")
    asked = []

    def solver(wrong_at: int | None):
        def solve(problems):
            asked.extend(p.difficulty for p in problems)
            return [p.answer if p.difficulty != wrong_at else "0" * len(p.answer) for p in problems]
        return solve

    assert verified_past(solver(None), addition, up_to=2)([problem]) == [problem.answer]
    assert set(asked) == {8, 4, 2, 1}  # checked down to the trusted 2 digits, and those once against their halves
    assert verified_past(solver(1), addition, up_to=2)([problem]) == [""]  # whose wrong halves sink them
    assert verified_past(solver(2), addition, up_to=1)([problem]) == [""]  # a wrong 2-digit part, checked from 1
    assert verified_past(solver(2), addition, up_to=2)([problem]) == [""]  # trusted but wrong: the 4-digit check fails
    asked.clear()
    assert verified_past(solver(None), addition, up_to=float("-inf"))([problem]) == [problem.answer]
    assert set(asked) == {8, 4, 2, 1}  # nothing trusted: down to single digits, which the split check passes
    asked.clear()

    def malformed(problems):
        asked.extend(p.difficulty for p in problems)
        return ["12"] * len(problems)

    assert verified_past(malformed, addition, up_to=float("-inf"))([problem]) == [""]
    assert asked == [8]  # a malformed answer fails at once: its parts are never asked
    assert verified_past(solver(None), Task(), up_to=2)([problem]) == [""]  # no check: nothing past the trusted lengths


def test_label_free_cycles_train_past_the_frontier_only_where_labels_can_be_found(setup):
    _, store, registry = setup
    cfg = tiny_config(max_difficulty=40, select=SelectConfig(mode="label_free"), frontier_spread=(0.5, 0.3, 0.2),
                      frontier_stride=0.2)
    loop = _loop(cfg, store, registry)
    # labels from the search's agreeing answers only (addition's decompositions off)
    cfg = replace(cfg, select=SelectConfig(mode="label_free", use_task_proposals=False))
    loop = _loop(cfg, store, registry)
    frontier = loop.curriculum.keys.index("15")  # stride 3: aimed at 15, 18, 21
    assert loop.plan.training_keys(frontier, {"16": 0.5, "17": 0.2, "18": 0.3, "21": 0.15}) == ["15", "18", "21"]
    # 18 and 21 self-verify almost nothing yet: the shares go to the furthest lengths that give labels
    assert loop.plan.training_keys(frontier, {"16": 0.5, "17": 0.2, "18": 0.05, "20": 0.01}) == ["15", "17", "17"]
    assert loop.plan.training_keys(frontier, {}) == ["15", "15", "15"]
    # with answers to train on, every length has labels
    verifier = _loop(replace(cfg, select=SelectConfig(mode="verifier")), store, registry)
    assert verifier.plan.training_keys(frontier, {}) == ["15", "18", "21"]
    # and so does a task that proposes labels by decomposition (addition's default)
    proposing = _loop(replace(cfg, select=SelectConfig(mode="label_free")), store, registry)
    assert proposing.plan.training_keys(frontier, {}) == ["15", "18", "21"]
    assert loop.plan.training_keys(None, {}) == [None, None, None]


def test_a_warm_start_short_of_mastery_is_extended_until_it_masters_or_runs_out():
    from agent.warm_start import master_warm_start
    from agent.policy import build_builtin_policy

    task = get_task("addition")
    model, tokenizer = build_builtin_policy(BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    cfg = WarmStartConfig(difficulties=(1, 2), examples_per_difficulty=20, check_problems=10, extensions=2,
                          train=TrainConfig(time_budget_s=60.0, max_steps=6))
    examples = warm_start_examples(task, cfg, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checks = master_warm_start(model, tokenizer, task, cfg, examples, seed=0)
    assert len(checks) == 3 and all(set(c) == {"1", "2"} for c in checks)  # an untrained model: both extensions ran
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # and they trained it
    assert cfg.extension().max_steps == 2 and cfg.extension().learning_rate == pytest.approx(cfg.train.learning_rate / 3)
    reached = master_warm_start(model, tokenizer, task, replace(cfg, mastery=0.0), examples, seed=0)
    assert len(reached) == 1  # mastered at the first check: nothing more to train
    assert master_warm_start(model, tokenizer, task, replace(cfg, mastery=None), examples, seed=0) == []


def test_a_cycle_searches_fewer_problems_as_answers_grow_past_its_token_budget(setup):
    settings, store, registry = setup
    # 64 problems with answers of up to 7 tokens (4 digits + 3) would be 448 answer tokens: half of them fit
    cfg = tiny_config(answer_tokens_per_cycle=224, train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=2))
    v0 = ensure_policy(settings, registry, cfg)
    records = _run(cfg, store, registry, v0)
    searched = store.trajectories(cycle=1, best_only=True)
    # problems x answer tokens stays within the budget (give or take a problem's rounding): each sample is at most
    # max_new_tokens long, so the search generated at most n times the budget
    assert 30 <= len(searched) < cfg.problems_per_cycle
    assert 0 < records[1].search_tokens <= cfg.search.n * (cfg.answer_tokens_per_cycle + 3 * 7)
    unbounded = tiny_config(answer_tokens_per_cycle=None)
    assert unbounded.problems_per_cycle * 7 > 224  # without the budget all 64 would have been searched


def test_proposals_trust_a_prefix_of_the_lengths_the_cycle_evaluated():
    """The mastery bound runs over the difficulties one evaluation holds: the lengths it skips (between the report's
    lengths, below the window) neither stop it nor extend it, and the first evaluated length that falls short ends
    it."""
    from agent.config import SelectConfig
    from agent.proposals import mastered_up_to
    from agent.select import select
    from search import Candidate, SearchResult
    from tasks.addition import make_problem

    evaluated = {"4": 1.0, "8": 0.99, **{str(d): 1.0 for d in range(17, 21)}, "21": 0.97, "22": 1.0}
    assert mastered_up_to(evaluated, 0.98) == 20
    assert mastered_up_to({**evaluated, "8": 0.9}, 0.98) == 4
    assert mastered_up_to({"3": 0.5, "4": 1.0}, 0.98) == float("-inf")
    problem = make_problem("1234567890", "9876543210")  # 10 digits: halves of 5 and 6, never evaluated themselves
    wrong = problem.answer[:-1] + "7"
    samples = SearchResult(problem, [Candidate(wrong, token_ids=[1], mean_logprob=-0.1, min_logprob=-0.1,
                                               mean_entropy=0.0, finished=True)] * 4, "best_of_n", "v0")
    asked = []

    def solve(problems):
        asked.extend(p.difficulty for p in problems)
        return [p.answer for p in problems]

    unchecked = SelectConfig(verify_proposal_parts=False)  # the prefix is what parts are trusted by only then
    chosen = select([samples], get_task("addition"), unchecked, solve, gate_metric=evaluated)
    assert [e["completion"] for e in chosen.examples] == [problem.answer]
    assert chosen.filters[-1]["trusted_up_to"] == 20 and {5, 6} <= set(asked)
    # a shorter bound than the halves, unchecked: nothing is asked of the policy there, the problem stays unlabelled
    asked.clear()
    assert select([samples], get_task("addition"), unchecked, solve,
                  gate_metric={"4": 1.0, "5": 0.9, "17": 1.0}).examples == []
    assert asked == [5, 5, 4]  # the split check's halves, and of the proposals' parts only the trusted 4 digits


def test_a_cycle_trusts_its_own_evaluation_over_older_scores_of_lengths_it_no_longer_evaluates(setup):
    """A length below the frontier's window kept its score from an early cycle (0.95, under the proposals' 0.98):
    proposals must still trust every length up to where the cycle's own evaluation falls short."""
    from agent.evaluation import Evaluation
    from agent.policy import Policy, build_builtin_policy

    _, store, registry = setup
    cfg = tiny_config(max_difficulty=40, report_difficulties=(4, 8), problems_per_cycle=8,
                      select=SelectConfig(mode="label_free", verify_proposal_parts=False))  # trusting by the bar
    loop = _loop(cfg, store, registry)
    loop.curriculum.update({str(d): 1.0 for d in range(1, 20)})
    loop.curriculum.update({"5": 0.95})  # an early cycle's score: still "mastered" for the curriculum's 0.9
    frontier = loop.curriculum.frontier_index
    assert loop.curriculum.key(frontier) == "20"
    keys = loop.plan.gate_keys(frontier)
    assert "5" not in keys and "4" in keys  # 5 digits is not evaluated any more
    scores = {k: (1.0 if int(k) < 20 else 0.0) for k in keys}
    evaluation = Evaluation("label_free", dict(scores), dict(scores))
    model, tokenizer = build_builtin_policy(BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    work = loop._search_and_select(1, Policy(model, tokenizer, "v0"), evaluation)
    proposed = work.filters[-1]
    assert proposed["name"] == "proposed" and proposed["trusted_up_to"] == 19


def test_problems_the_search_fails_train_on_the_answers_the_user_gave_and_the_curriculum_moves_on(setup):
    """An untrained policy never finds these answers: every label is the problem's own answer, the candidate learns
    them, the frontier passes the length they taught, and the record and report count labels by source."""
    import json
    from agent.curriculum import FileSource
    from agent.report import write_report
    from tasks import Problem, Task
    from tests.support import tiny_promoted_policy

    settings, store, registry = setup
    v0 = tiny_promoted_policy(registry)
    # one answer to every problem: learnable in a few dozen steps, never sampled by chance
    problems = [Problem(f"{i:0{d}d}>", "yes", id=f"{split}-{d}-{i}", difficulty=d, split=split)
                for d in (1, 2) for split in ("train", "heldout") for i in range(10 ** d)]
    cfg = tiny_config(select=SelectConfig(mode="verifier"), problems_per_cycle=40, report_difficulties=(),
                      replay_refine_fraction=0.0, train=TrainConfig(learning_rate=5e-3, time_budget_s=60.0, max_steps=20))
    source = FileSource(problems, Task(), max_new_tokens=4)
    loop = SelfImprovementLoop(cfg, store, registry, source, seed_examples=[])
    runs = RunStore(store)
    runs.create("given", asdict(cfg), {})
    runs.set_base("given", v0, promote=False)
    records = loop.run("given", time.monotonic())
    before, after = records
    assert before.frontier == "1" and before.heldout == {"1": 0.0, "2": 0.0}
    assert after.trained_given > 0 and after.trained_searched + after.trained_given == after.accepted
    assert after.promoted and min(after.heldout.values()) >= cfg.threshold, (after.heldout, after.seconds)
    assert after.frontier is None  # learned from the given answers alone: the curriculum moved on past both
    assert {r.version: r for r in store.policies()}["v1"].trained_on["given_answers"] == after.trained_given
    report = write_report(settings.home / "report", records, "v1", {})
    assert report["trained_on"] == {"searched": after.trained_searched, "given": after.trained_given}
    text = (settings.home / "report" / "report.md").read_text()
    assert f"and {after.trained_given} given answers" in text and "| searched | given |" in text
    assert json.loads((settings.home / "report" / "report.json").read_text())["cycles"][1]["trained_given"] > 0


def test_the_default_report_reaches_100_digits_and_the_builtin_policy_decodes_them(setup, monkeypatch):
    """Under the loop's defaults a 100-digit problem fits the built-in policy (prompt, 101-digit answer and end within
    its positions, its decode budget and a fine-tune's sequences), goes through the greedy evaluation and is in the
    cycle record; past the report's longest length nothing is trained or evaluated before the frontier gets there."""
    from agent.jobs import check_context
    from agent.policy import Policy, build_builtin_policy, coupled_positions

    defaults = LoopConfig()
    assert max(defaults.report_difficulties) == 100 and defaults.max_difficulty > 100
    addition = get_task("addition")
    problem = addition.generate(100, 1, seed=0, split="heldout")[0]
    model, tokenizer = build_builtin_policy(defaults.builtin)
    sequence = tokenizer(problem.prompt + problem.answer + tokenizer.eos_token)["input_ids"]
    answer = tokenizer(problem.answer + tokenizer.eos_token)["input_ids"]
    assert len(answer) == 102 <= addition.max_new_tokens(100) and len(sequence) <= defaults.train.max_length
    check_context(Policy(model, tokenizer, "v0"), problem.prompt, addition.max_new_tokens(100))  # no ContextTooLong
    ids = torch.tensor([sequence])
    positions, _ = coupled_positions(model.config, ids, torch.ones_like(ids))
    assert int(positions.max()) < defaults.builtin.max_positions

    settings, store, registry = setup
    cfg = tiny_config(cycles=0, report_difficulties=defaults.report_difficulties, max_difficulty=defaults.max_difficulty,
                      heldout_past_window=2)
    tiny, tokenizer = build_builtin_policy(cfg.builtin)
    v0 = registry.save(tiny, tokenizer, parent=None, trained_on={})
    import agent.loop

    budgets, real = [], agent.loop.evaluate_policy
    monkeypatch.setattr(agent.loop, "evaluate_policy",
                        lambda policy, by, search, *a: budgets.append((sorted(by, key=int), search.max_new_tokens))
                        or real(policy, by, search, *a))
    records = _run(cfg, store, registry, v0)
    assert "100" in records[0].heldout and str(defaults.max_difficulty) not in records[0].heldout
    # the evaluation's greedy search has room for a 101-digit answer and its end (the search's default is 64 tokens)
    assert budgets[0][0][-1] == "100" and budgets[0][1] >= 102
    loop = _loop(cfg, store, registry)
    horizon = loop.curriculum.keys.index("100")
    loop.curriculum.update({str(d): 1.0 for d in range(1, 90)})  # frontier 90: stride 18 would aim at 108 and 126
    assert loop.plan.training_keys(loop.curriculum.frontier_index, {}) == ["90", "100", "100"]
    assert loop.plan.gate_keys(loop.curriculum.frontier_index)[-1] == "100"
    loop.curriculum.update({str(d): 1.0 for d in range(90, 101)})  # past the report's longest: the curriculum goes on
    assert loop.curriculum.frontier_index == horizon + 1
    assert loop.plan.training_keys(loop.curriculum.frontier_index, {}) == ["101", "121", "141"]


def test_a_value_model_trains_with_every_promoted_candidate_and_continues_the_last(setup, monkeypatch):
    import search.calibration
    from agent.config import ValueConfig
    from agent.registry import value_folder

    settings, store, registry = setup
    # the calibration scores the candidate's greedy answers the gate decoded: it decodes none again
    monkeypatch.setattr(search.calibration, "run_search",
                        lambda *a, **k: pytest.fail("calibration decoded answers the gate had decoded"))
    # promote_margin -1: every candidate is promoted, so each cycle's value model is kept beside it
    cfg = tiny_config(cycles=2, value_model=True, promote_margin=-1.0, value_refresh_auroc=1.0,
                      value=ValueConfig(time_budget_s=5.0, trunk_batch=32, epochs=2),
                      train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=10))
    v0 = ensure_policy(settings, registry, cfg)
    records = _run(cfg, store, registry, v0)
    assert [r.promoted for r in records[1:]] == [True, True]
    first, second = records[1].value, records[2].value
    assert first["completions"] > 0 and 0 < first["right"] < first["completions"] and first["steps"] > 0
    assert first["continued_from"] is None and first["calibrated_on"] > 0 and "accept_score" in first
    # the second cycle continues the first one's judge (loaded with v1) on its own labels plus a replay share
    assert second["continued_from"] == "v1" and second["replayed"] > 0
    assert second["steps_in_all"] == first["steps"] + second["steps"]
    assert records[2].seconds["value"] > 0
    for version in ("v1", "v2"):
        assert value_folder(registry, version).is_dir()
        loaded = registry.load(version)
        assert loaded.value_model is not None and loaded.value_model.meta["steps"] > 0
    assert registry.load("v2").value_model.accept_score == second["accept_score"]


def test_a_rejected_candidate_trains_no_value_model(setup):
    from agent.config import ValueConfig
    from agent.registry import value_folder

    settings, store, registry = setup
    cfg = tiny_config(value_model=True, promote_margin=1.0, value=ValueConfig(time_budget_s=5.0),
                      train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=5))
    v0 = ensure_policy(settings, registry, cfg)
    (_, record) = _run(cfg, store, registry, v0)
    assert not record.promoted and record.value == {} and "value" not in record.seconds
    assert not value_folder(registry, "v1").exists()


def test_a_rejected_cycle_moves_the_frontier_past_lengths_the_current_policy_masters(setup, monkeypatch):
    """The gate measures the current policy at lengths its stored evaluation lacks; where it masters them, the
    frontier moves on though no candidate was promoted (else each next candidate ties there and is rejected)."""
    import agent.loop
    from agent.gate import judge

    def judged_current_masters_the_gate_keys(*args, **kwargs):
        verdict = judge(*args, **kwargs)
        keys = verdict.keys
        mastered = {k: (1.0 if k in keys else v) for k, v in verdict.current.metric.items()}
        return replace(verdict, promote=False, current=replace(verdict.current, accuracy=mastered))

    monkeypatch.setattr(agent.loop, "judge", judged_current_masters_the_gate_keys)
    settings, store, registry = setup
    cfg = tiny_config(train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=3))
    v0 = ensure_policy(settings, registry, cfg)
    first, second = _run(cfg, store, registry, v0)
    assert not second.promoted and second.policy_version == v0
    assert first.frontier is not None and first.heldout[first.frontier] < cfg.threshold
    assert second.heldout[first.frontier] == 1.0
    assert second.frontier is None or int(second.frontier) > int(first.frontier)


def test_a_run_whose_gate_keeps_rejecting_stops_and_says_which_lengths_fell(setup):
    from agent.gate import gate_keeps_rejecting

    settings, store, registry = setup
    # promote_margin 1: no candidate can pass the gate, and each cycle starts again from v0: it would repeat the last
    cfg = tiny_config(cycles=6, promote_margin=1.0, stop_after_rejections=2, continue_rejected=False,
                      train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=3))
    v0 = ensure_policy(settings, registry, cfg)
    loop = _loop(cfg, store, registry)
    RunStore(store).create("test", asdict(cfg), {})
    RunStore(store).set_base("test", v0, promote=False)
    records = loop.run("test", time.monotonic())
    assert [r.cycle for r in records] == [0, 1, 2] and not any(r.promoted for r in records)
    assert loop.stop_reason.startswith(f"stopped: the gate rejected 2 candidates in a row trained from {v0}")
    assert "cycle 1: " in loop.stop_reason and "cycle 2: " in loop.stop_reason and "--train-seconds" in loop.stop_reason
    # a promotion in between, a cycle that trained nothing, or 0 (never) keep a run going
    promoted = replace(records[1], promoted=True)
    assert gate_keeps_rejecting([records[0], promoted, records[2]], 2, "verifier") is None
    assert gate_keeps_rejecting([records[0], replace(records[1], candidate=None), records[2]], 2, "verifier") is None
    assert gate_keeps_rejecting(records, 0, "verifier") is None
    assert "label checks" in gate_keeps_rejecting(records, 2, "label_free")
    with pytest.raises(ValueError, match="stop_after_rejections"):
        tiny_config(stop_after_rejections=-1)


def test_a_rejected_candidate_trains_on_in_the_next_cycle_where_answers_are_given_and_after_a_resume(setup):
    settings, store, registry = setup
    cfg = tiny_config(cycles=1, promote_margin=1.0, stop_after_rejections=0,
                      train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=3))
    v0 = ensure_policy(settings, registry, cfg)
    (_, first) = _run(cfg, store, registry, v0)
    assert not first.promoted and "continued_from" not in first.train
    # the same run resumed by a new process for two more cycles: each continues the candidate rejected before it
    records = _loop(replace(cfg, cycles=3), store, registry).run("test", time.monotonic())
    assert [(r.candidate, r.train.get("continued_from")) for r in records[2:]] == [("v2", "v1"), ("v3", "v2")]
    assert all(r.policy_version == v0 for r in records)
    # label-free labels may be wrong: a rejected candidate's training is dropped there
    lf = tiny_config(cycles=2, promote_margin=1.0, stop_after_rejections=0, select=SelectConfig(mode="label_free"),
                     train=TrainConfig(learning_rate=2e-3, time_budget_s=60.0, max_steps=3))
    records = _run(lf, store, registry, v0, name="label-free")
    assert all("continued_from" not in r.train for r in records[1:] if r.candidate)


def test_continued_candidates_stop_a_run_only_once_they_stop_gaining():
    from agent.gate import gate_keeps_rejecting
    from agent.loop import CycleRecord

    def rejected(cycle, score):
        return CycleRecord(cycle, "v0", f"v{cycle}", False, "5", {}, {}, {"candidate": score, "current": 0.9}, 10, [],
                           {}, {}, 0.0)

    gaining = [rejected(1, 0.2), rejected(2, 0.3), rejected(3, 0.4), rejected(4, 0.5)]
    assert gate_keeps_rejecting(gaining, 2, "verifier", continuing=True) is None
    assert gate_keeps_rejecting(gaining, 2, "verifier").startswith("stopped: the gate rejected 2")  # a restart each time
    stalled = gaining + [rejected(5, 0.45), rejected(6, 0.5)]
    assert gate_keeps_rejecting(stalled, 2, "verifier", continuing=True).startswith("stopped: the gate rejected 2")


def test_a_file_whose_answers_teach_trains_every_unmastered_length_at_once():
    """Verifier mode on a user's file: the cycle draws problems at every length from the frontier to the longest and
    the gate sees them all; label-free, the frontier's shares as before."""
    from agent.curriculum import Curriculum, FileSource
    from agent.plan import CyclePlan
    from tasks import Problem, Task

    problems = [Problem(f"{'a' * d}{i}|", "x", id=f"{split}-{d}-{i}", difficulty=d, split=split)
                for d in range(2, 11) for split in ("train", "heldout") for i in range(20)]
    source = FileSource(problems, Task())
    cfg = tiny_config(select=SelectConfig(mode="verifier"), problems_per_cycle=90, report_difficulties=(), eval_ahead=1)
    curriculum = Curriculum(source.difficulties(), cfg.threshold)
    curriculum.update({"2": 1.0, "3": 1.0, "4": 0.5})
    plan = CyclePlan(cfg, curriculum, source)
    drawn = plan.problems(curriculum.frontier_index, {}, cycle=1)
    assert sorted({p.difficulty for p in drawn}) == list(range(4, 11))
    assert len(drawn) == 7 * 12 + 90 % 7  # equal shares (the remainder at the frontier), each within its length's pool
    assert plan.gate_keys(curriculum.frontier_index)[-1] == "10"
    label_free = CyclePlan(replace(cfg, select=SelectConfig(mode="label_free")), curriculum, source)
    assert {p.difficulty for p in label_free.problems(curriculum.frontier_index, {"4": 0.5, "5": 0.5}, 1)} < set(range(4, 11))
