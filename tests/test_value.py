"""The value model (agent/value.py): prefix values, the `value` scorer, and saving it beside a registry version."""

from __future__ import annotations

import pytest
import torch

from agent.value import ValueConfig, ValueModel, prefix_targets, train_value
from search.calibration import auroc
from search import SearchConfig, run_search
from search.scorers import load_scorer, rank_by
from search.types import Candidate
from tasks import get_task, verify

FAST = ValueConfig(trunk="frozen", hidden=128, epochs=60, time_budget_s=30)


def _labelled(policy, problems, seed=0):
    """The policy's own sampled answers to `problems` plus each right answer, labelled by the checker: real model
    outputs (an untrained policy is almost never right, so the right answer is added as the loop's accepted label
    would be)."""
    res = run_search(problems, SearchConfig(strategy="best_of_n", n=6, temperature=1.0, max_new_tokens=4, seed=seed),
                     policy)
    out = []
    for r in res:
        texts = {c.completion for c in r.candidates if c.finished} | {r.problem.answer}
        out += [{"prompt": r.problem.prompt, "completion": t, "label": bool(verify(r.problem, t))} for t in sorted(texts)]
    return res, out


@pytest.fixture(scope="module")
def trained(tiny_policy):
    torch.set_num_threads(1)
    problems = get_task("addition").generate(2, 24, seed=3)
    res, labelled = _labelled(tiny_policy, problems)
    return res, labelled, train_value(tiny_policy, labelled, FAST)


def test_prefix_values_match_scoring_each_prefix_alone(tiny_policy, trained):
    _, labelled, vm = trained
    tok = tiny_policy.tokenizer
    for e in labelled[:6]:
        ids = tok(e["completion"], add_special_tokens=False).input_ids
        values = vm.score([e["prompt"]], [ids], [True])[0]
        assert len(values) == len(ids) + 2  # the prompt alone, each token, EOS
        for k in range(len(ids) + 1):
            alone = vm.score([e["prompt"]], [ids[:k]], [False])[0]
            assert alone == pytest.approx(values[: k + 1], abs=1e-5)
        # the finished answer's value: the last entry, whatever else shares its batch (left padding included)
        batch = vm.score([x["prompt"] for x in labelled[:12]], [x["completion"] for x in labelled[:12]])
        assert batch[labelled.index(e)][-1] == pytest.approx(values[-1], abs=1e-5)


def test_prefix_targets_are_the_share_of_right_answers_through_each_prefix():
    targets = prefix_targets(["p", "p", "p", "q"], [[1, 2], [1, 3], [4, 2], [1, 2]], [True, False, False, False])
    assert targets[0] == [1 / 3, 1 / 2, 1.0, 1.0]
    assert targets[1] == [1 / 3, 1 / 2, 0.0, 0.0]
    assert targets[2] == [1 / 3, 0.0, 0.0, 0.0]
    assert targets[3] == [0.0, 0.0, 0.0, 0.0]  # another prompt: its own counts


def test_value_reranking_picks_the_right_answer_it_learned(tiny_policy, trained):
    res, labelled, vm = trained
    policy = type(tiny_policy)(tiny_policy.model, tiny_policy.tokenizer, "v-test", value_model=vm)
    by_value = load_scorer("value", False, 1.0, policy)
    by_confidence = load_scorer("mean_logprob", False, 1.0, policy)
    tok = policy.tokenizer
    picked = {"value": 0, "mean_logprob": 0}
    scores, labels = [], []
    for r in res:
        cands = []
        for e in (x for x in labelled if x["prompt"] == r.problem.prompt):
            ids = tok(e["completion"], add_special_tokens=False).input_ids
            lps = _logprobs(policy, r.problem.prompt, ids)
            cands.append(Candidate(e["completion"], ids, sum(lps) / len(lps), min(lps), 0.0, True,
                                   verified=e["label"], logprobs=lps))
        for name, scorer in (("mean_logprob", by_confidence), ("value", by_value)):
            picked[name] += bool(rank_by(scorer, r.problem, cands)[0].verified)
        scores += [c.score for c in cands]  # the value's, ranked last
        labels += [bool(c.verified) for c in cands]
    assert picked["value"] >= 0.9 * len(res)  # it learned which of these answers are right
    assert picked["value"] > picked["mean_logprob"]  # which the untrained policy's confidence does not know
    assert auroc(scores, labels) > 0.9


def _flat(tables):
    return [v for row in tables for v in row]


def _logprobs(policy, prompt, ids):
    tok = policy.tokenizer
    full = tok(prompt, add_special_tokens=False).input_ids + ids + [tok.eos_token_id]
    with torch.inference_mode():
        logp = torch.log_softmax(policy.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    start = len(full) - len(ids) - 1
    return [logp[start - 1 + i, t].item() for i, t in enumerate(full[start:])]


def test_value_scorer_ranks_search_and_mixes_with_confidence(tiny_policy, trained):
    _, _, vm = trained
    policy = type(tiny_policy)(tiny_policy.model, tiny_policy.tokenizer, "v-test", value_model=vm)
    problems = get_task("addition").generate(2, 4, seed=9)
    for strategy in ("best_of_n", "step_beam", "mcts"):
        cfg = SearchConfig(strategy=strategy, n=4, children=2, beams=2, simulations=2, max_step_tokens=2,
                           max_new_tokens=4, scorer="value")
        for r in run_search(problems, cfg, policy):
            finished = [c for c in r.candidates if c.finished]
            values = vm.score([r.problem.prompt] * len(finished), [c.token_ids for c in finished])
            assert [c.score for c in finished] == pytest.approx([v[-1] for v in values], abs=1e-5)
            assert [c.score for c in finished] == sorted((c.score for c in finished), reverse=True)
    mixed = run_search(problems, SearchConfig(strategy="best_of_n", n=4, max_new_tokens=4, scorer="value+mean_logprob"),
                       policy)
    for r in mixed:
        finished = [c for c in r.candidates if c.finished]
        values = vm.score([r.problem.prompt] * len(finished), [c.token_ids for c in finished])
        assert [c.score for c in finished] == pytest.approx([v[-1] + c.mean_logprob for v, c in zip(values, finished)],
                                                           abs=1e-5)


def test_value_without_a_value_model_is_a_one_line_refusal(tiny_policy):
    cfg = SearchConfig(strategy="best_of_n", n=2, max_new_tokens=3, scorer="value")  # a config alone is fine
    with pytest.raises(ValueError) as err:
        run_search(get_task("addition").generate(1, 2, seed=0), cfg, tiny_policy)
    message = str(err.value)
    assert "\n" not in message and "value model" in message and "v-test" in message
    with pytest.raises(ValueError, match="value model"):
        SearchConfig(strategy="mcts", scorer="value+mean_logprob").build_scorer(tiny_policy)


def test_value_model_round_trips_beside_a_registry_version(tmp_path, tiny_policy, trained):
    from agent.registry import PolicyRegistry, load_value, save_value, value_folder
    from agent.store import Store

    _, labelled, vm = trained
    registry = PolicyRegistry(tmp_path / "policies", Store(f"sqlite:///{tmp_path / 'arbor.db'}"))
    version = registry.save(tiny_policy.model, tiny_policy.tokenizer, parent=None, trained_on={})
    assert registry.load(version).value_model is None
    folder = save_value(registry, version, vm)
    assert folder == value_folder(registry, version) and folder.parent == registry.folder(version).parent
    loaded = registry.load(version)
    prompts, texts = [e["prompt"] for e in labelled[:8]], [e["completion"] for e in labelled[:8]]
    assert _flat(loaded.value_model.score(prompts, texts)) == pytest.approx(_flat(vm.score(prompts, texts)), abs=1e-5)
    assert load_value(registry, version, loaded).meta == vm.meta
    # saved again (a retrained model): replaced whole, the version's own folder untouched
    files = sorted(p.name for p in registry.folder(version).iterdir())
    save_value(registry, version, vm)
    assert sorted(p.name for p in registry.folder(version).iterdir()) == files
    assert not list(registry.root.glob(".tmp-*"))


def test_a_tuned_trunk_round_trips(tmp_path, tiny_policy, trained):
    _, labelled, _ = trained
    before = [p.detach().clone() for p in tiny_policy.model.parameters()]
    vm = train_value(tiny_policy, labelled[:40], ValueConfig(trunk="tuned", epochs=1, trunk_batch=16))
    vm.save(tmp_path / "value")
    loaded = ValueModel.load(tmp_path / "value", tiny_policy)
    texts = [e["completion"] for e in labelled[:6]]
    prompts = [e["prompt"] for e in labelled[:6]]
    assert _flat(loaded.score(prompts, texts)) == pytest.approx(_flat(vm.score(prompts, texts)), abs=1e-5)
    assert loaded.trunk is not tiny_policy.model  # a copy trained, the policy left as it was
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_policy.model.parameters()))


def test_train_value_refuses_labels_of_one_kind(tiny_policy):
    with pytest.raises(ValueError, match="both right and wrong"):
        train_value(tiny_policy, [{"prompt": "1+2=", "completion": "30", "label": True}], FAST)


def test_mcts_with_prefix_values_needs_no_rollouts(tiny_policy, trained):
    _, _, vm = trained
    policy = type(tiny_policy)(tiny_policy.model, tiny_policy.tokenizer, "v-test", value_model=vm)
    problems = get_task("addition").generate(2, 6, seed=4)
    common = dict(strategy="mcts", simulations=3, children=2, max_step_tokens=1, max_new_tokens=4, scorer="value")
    rollout = run_search(problems, SearchConfig(**common), policy)
    prefix = run_search(problems, SearchConfig(**common, leaf_value="prefix"), policy)
    assert sum(r.generated_tokens for r in prefix) < sum(r.generated_tokens for r in rollout)
    for r in prefix:
        # every tree ends with an answer (a final greedy rollout where search found none), or one cut at the cap
        assert r.best.finished or len(r.best.token_ids) == 4
        for c in r.candidates:
            value = vm.score([r.problem.prompt], [c.token_ids], [c.finished])[0][-1]
            assert c.score == pytest.approx(value if c.finished else value - 1e6, abs=1e-5)
    with pytest.raises(ValueError, match="leaf_value"):
        SearchConfig(strategy="mcts", leaf_value="guess")


def test_arbor_search_scores_by_the_value_model_beside_the_folder(tmp_path, tiny_policy, trained):
    import json
    import re

    from typer.testing import CliRunner

    from arbor.cli import app

    _, _, vm = trained
    folder = tmp_path / "v1"
    tiny_policy.model.save_pretrained(folder)
    tiny_policy.tokenizer.save_pretrained(folder)
    args = ["search", "--model", str(folder), "--strategy", "best_of_n", "--n", "4", "--prompt", "12+34=",
            "--max-new-tokens", "4", "--scorer", "value", "--json"]
    refused = CliRunner().invoke(app, args)
    said = re.sub(r"[│╭╮╰╯─\s]+", " ", refused.output)  # typer boxes and wraps the message
    assert refused.exit_code == 2 and "needs a value model" in said and "Traceback" not in said
    vm.save(tmp_path / "v1.value")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    value = vm.score(["12+34="], [row["token_ids"]], [row["finished"]])[0][-1]
    assert row["score"] == pytest.approx(value if row["finished"] else value - 1e6, abs=1e-5)


def test_value_vote_weighs_each_answer_by_the_value_behind_it():
    from agent.value import value_vote
    from search.types import SearchResult

    problem = get_task("addition").generate(1, 1, seed=0)[0]
    right, wrong = problem.answer, ("1" if problem.answer[0] != "1" else "2") + problem.answer[1:]

    def cand(text, value, finished=True):
        return Candidate(text, [], 0.0, 0.0, 0.0, finished, score=value)

    # three weak votes for the wrong answer against two strong ones for the right answer: value outweighs count
    result = SearchResult(problem, [cand(wrong, 0.2), cand(wrong, 0.2), cand(wrong, 0.2), cand(right, 0.9),
                                    cand(right, 0.8), cand("9" * 9, 5.0, finished=False)], "best_of_n", "v")
    assert value_vote(result, get_task("addition")).completion == right
    result.candidates[3].score = result.candidates[4].score = 0.25
    assert value_vote(result, get_task("addition")).completion == wrong


def test_the_value_floor_keeps_the_labels_its_judge_trusts_and_falls_back_to_the_next_contender(tiny_policy, trained):
    """Label-free selection with SelectConfig.min_value: a problem keeps the most supported answer whose completion the
    value model scores at least the floor; a problem none of whose contenders reaches it is dropped."""
    from agent.config import SelectConfig
    from agent.select import select
    from search.types import SearchResult

    res, labelled, vm = trained
    task = get_task("addition")

    def wrong_answer(right):
        return ("1" if right[0] != "1" else "2") + right[1:]

    results, values = [], {}
    for r in res:
        wrong, right = wrong_answer(r.problem.answer), r.problem.answer
        # the wrong answer has the most votes; the right one is the runner-up contender
        results.append(SearchResult(r.problem, [Candidate(t, [], -0.1, -0.1, 0.0, True) for t in (wrong, wrong, right)],
                                    "best_of_n", "v"))
        for text, v in zip((wrong, right), vm.score([r.problem.prompt] * 2, [wrong, right])):
            values[(r.problem.prompt, text)] = v[-1]
    # a floor between the two values of a problem whose judge prefers its right answer: the wrong majority falls below
    # it there and the runner-up takes its place
    prefers_right = [(values[(r.problem.prompt, wrong_answer(r.problem.answer))], values[(r.problem.prompt, r.problem.answer)])
                     for r in results]
    low, high = max(prefers_right, key=lambda pair: pair[1] - pair[0])
    assert high > low
    floor = (low + high) / 2
    cfg = SelectConfig(min_vote_share=0.6, checked_min_share=0.3, use_task_filters=False, use_task_proposals=False,
                       calibration_quantile=None, min_value=floor)
    selection = select(results, task, cfg, solve=lambda problems: [""] * len(problems), value_model=vm)
    stage = selection.filters[-1]
    assert stage["name"] == "value" and stage["floor"] == floor
    expected = {}
    for r in results:
        trusted = [c for c in (wrong_answer(r.problem.answer), r.problem.answer) if values[(r.problem.prompt, c)] >= floor]
        if trusted:
            expected[r.problem.prompt] = trusted[0]
    assert {e["prompt"]: e["completion"] for e in selection.examples} == expected
    assert stage["kept"] == len(expected)
    assert any(expected.get(r.problem.prompt) == r.problem.answer for r in results)  # a runner-up took a majority's place
    # without a value model the floor is off: the majority (wrong) answer of every problem is kept
    plain = select(results, task, cfg, solve=lambda problems: [""] * len(problems))
    assert [f["name"] for f in plain.filters] == ["format", "vote_share"] and plain.filters[-1]["precision"] == 0.0


def test_demonstrations_are_the_right_answers_and_the_policys_different_ones_the_wrong(tiny_policy):
    from dataclasses import replace

    from agent.config import LoopConfig
    from agent.value_cycle import demonstration_candidates
    from tasks import Task

    torch.set_num_threads(1)
    demos = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    cfg = replace(LoopConfig(), value_demonstrations=3)
    rows = demonstration_candidates(tiny_policy, demos, Task(), cfg, seed=0)
    chosen = [r for r in rows if r["completion"] in {d["completion"] for d in demos} and r["label"]]
    prompts = {r["prompt"] for r in rows}
    assert len(prompts) == 3  # value_demonstrations prompts, each with its demonstration as a right completion
    assert {(r["prompt"], r["completion"]) for r in chosen} >= {(d["prompt"], d["completion"]) for d in demos
                                                                  if d["prompt"] in prompts}
    answer = {d["prompt"]: d["completion"] for d in demos}
    assert all(r["label"] == (r["completion"].strip() == answer[r["prompt"]]) for r in rows)
    # an untrained policy's samples state other answers: the wrong completions the judge learns from
    assert len(rows) > 3 and any(not r["label"] for r in rows)
    assert demonstration_candidates(tiny_policy, demos, Task(), cfg, seed=0) == rows  # seeded


def test_the_current_judge_is_kept_where_training_it_would_not_pay_and_trains_on_where_it_would(tiny_policy, trained):
    """train_cycle_value: the current version's tuned judge is carried to the candidate (recalibrated, not trained)
    while its AUROC on the cycle's labelled candidates reaches value_refresh_auroc, or stays under
    value_learning_auroc, or when they are all of one kind; in between it trains on, continuing from the current one."""
    import copy
    import random
    from dataclasses import replace

    from agent.config import LoopConfig
    from agent.value_cycle import judged_auroc, train_cycle_value

    torch.set_num_threads(1)
    _, labelled, _ = trained
    base = replace(LoopConfig(), value_model=True,
                   value=ValueConfig(trunk="tuned", time_budget_s=10.0, trunk_batch=16, epochs=8))
    judge = train_value(tiny_policy, labelled, base.value)
    current = copy.copy(tiny_policy)
    current.version, current.value_model = "v1", judge
    # the same candidates with a third of them also under the other label: the judge ranks them only fairly well
    labelled = labelled + [dict(row, label=not row["label"]) for row in labelled[::3]]
    fit = judged_auroc(judge, labelled, random.Random(0))
    assert 0.55 < fit < 0.95

    def cycle(newest, refresh, learning, policy=current):
        cfg = replace(base, value_refresh_auroc=refresh, value_learning_auroc=learning)
        return train_cycle_value(policy, tiny_policy, newest, [], cfg, random.Random(0), [], 8)

    kept = cycle(labelled, refresh=fit - 0.01, learning=0.5)
    assert kept.record["auroc_before"] == pytest.approx(fit, abs=1e-4) and kept.record["steps"] == 0
    assert kept.record["kept_from"] == "v1" and kept.record["kept_because"] == "still judges well"
    assert kept.model.trunk is judge.trunk and kept.model.meta is not judge.meta  # calibrating it leaves v1's alone
    stuck = cycle(labelled, refresh=1.0 - 1e-9, learning=fit + 0.01)
    assert stuck.record["kept_because"] == "its training does not carry to new candidates"
    retrained = cycle(labelled, refresh=fit + 0.01, learning=fit - 0.01)
    assert retrained.record["kept_from"] is None and retrained.record["continued_from"] == "v1"
    assert retrained.record["steps"] > 0 and retrained.model.trunk is not judge.trunk
    every = cycle(labelled, refresh=1.0, learning=0.5)  # 1: trained every cycle, the judge not even checked
    assert every.record["auroc_before"] is None and every.record["steps"] > 0

    # nothing to tell apart: the current judge stays rather than the candidate going without one
    right = [row for row in labelled if row["label"]]
    assert cycle(right, 0.9, 0.6).record["kept_because"] == "one kind of label"
    assert cycle(right, 0.9, 0.6, policy=copy.copy(tiny_policy)).model is None
