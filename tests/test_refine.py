"""Refinement examples from the search's own siblings, and their share of the training mix (the jobs' rounds:
tests/test_workers_unit.py)."""

from __future__ import annotations

import random

from agent.config import LoopConfig
from agent.loop import replay_mix
from agent.refine import MAX_SHOWN_ATTEMPTS, answer_key, sibling_examples
from search import Candidate, SearchResult
from tasks import Problem, Task, get_task
from tasks.addition import make_problem


def _cand(text: str, verified: bool | None, score: float = -1.0) -> Candidate:
    return Candidate(text, [1] * len(text), score, score, 0.5, True, verified=verified, score=score)


def test_wrong_siblings_become_attempts_completed_by_the_verified_label():
    p = Problem("123+456=", "579", id="p")
    result = SearchResult(p, [_cand("12", False), _cand("579", True), _cand("12", False), _cand("13", False),
                              _cand(" 579", True)], "best_of_n", "v0")
    examples = sibling_examples([result], [{"problem_id": "p", "completion": "579"}], Task(), None)
    rejected = "# feedback: rejected by the exact checker\n"
    # each distinct wrong answer once, in rank order, as the attempts of rounds 1 and 2
    assert [e["prompt"] for e in examples] == [f"# attempt: 12\n{rejected}123+456=",
                                               f"# attempt: 12\n{rejected}# attempt: 13\n{rejected}123+456="]
    assert {e["completion"] for e in examples} == {"579"} and {e["problem_id"] for e in examples} == {"p"}
    # a problem without a label gives none
    assert sibling_examples([result], [], Task(), None) == []


def test_label_free_siblings_carry_the_failing_check_and_passing_ones_are_not_shown():
    task = get_task("addition")
    labelled = make_problem("12", "34", id="lf")  # 21 + 43 = 64: "460" least significant digit first
    p = Problem(labelled.prompt, task="addition", id="lf", difficulty=2)  # no answer: label-free
    halves = {"1+3=": "40", "2+4=": "60"}
    solve = lambda problems: [halves.get(q.prompt, "00") for q in problems]  # noqa: E731
    siblings = [_cand("460", None), _cand("470", None), _cand("4x0", None), _cand("480", None), _cand("490", None),
                _cand("400", None)]
    examples = sibling_examples([SearchResult(p, siblings, "best_of_n", "v0")],
                                [{"problem_id": "lf", "completion": "460"}], task, solve)
    assert len(examples) == MAX_SHOWN_ATTEMPTS
    assert examples[1]["prompt"] == ("# attempt: 470\n# feedback: rejected by the split check\n"
                                     "# attempt: 4x0\n# feedback: rejected: not an answer of the expected form\n"
                                     f"{p.prompt}")
    assert all(e["completion"] == "460" for e in examples)


def test_refinement_examples_take_their_share_from_the_newest_labels():
    cfg = LoopConfig(examples_per_cycle=1000, replay_seed_fraction=0.3, replay_newest_fraction=0.35,
                     replay_refine_fraction=0.05)
    seed = [{"prompt": "s", "completion": "1"}]
    newest = [{"prompt": "n", "completion": "2"}]
    older = [{"prompt": "o", "completion": "3"}]
    refinements = [{"prompt": "# attempt: 9\n# feedback: rejected by the split check\nn", "completion": "2"}]
    mix = replay_mix(seed, newest, older, cfg, random.Random(0), refinements)
    counts = {k: sum(e["prompt"] == k for e in mix) for k in ("s", "n", "o", refinements[0]["prompt"])}
    assert list(counts.values()) == [300, 300, 350, 50] and len(mix) == 1000
    # without refinement examples the mix is the one it always was, draw for draw
    assert replay_mix(seed, newest, older, cfg, random.Random(0)) == replay_mix(seed, newest, older, cfg,
                                                                                 random.Random(0), [])


def _tiny_coupled_policy():
    from agent.config import BuiltinConfig
    from agent.policy import Policy, build_builtin_policy

    model, tokenizer = build_builtin_policy(BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                                          num_heads=2, seed=3))
    return Policy(model, tokenizer, "tiny")


def test_a_repair_changes_the_least_confident_token_and_decodes_the_rest_greedily():
    from dataclasses import replace

    from search import SearchConfig, run_search
    from search.repair import branch_points, repair

    policy = _tiny_coupled_policy()
    problem = make_problem("1234", "5678", id="r")
    answer = run_search([problem], SearchConfig(strategy="greedy", max_new_tokens=7), policy)[0].best
    (branches,) = branch_points(policy, [problem], [answer])
    steps = answer.token_ids + ([policy.tokenizer.eos_token_id] if answer.finished else [])  # stopping is a step too
    assert len(branches) == len(steps) and [b.margin for b in branches] == sorted(b.margin for b in branches)
    # greedy chose every token, so the model preferred it: no margin is negative
    assert all(b.margin >= 0 for b in branches)
    first = branches[0]
    assert list(first.prefix) == answer.token_ids[: first.position] and first.token != steps[first.position]
    (fixed,) = repair(policy, [problem], [first], max_new_tokens=10)
    head = list(first.prefix) + [first.token]
    assert fixed.best.token_ids[: len(head)] == head
    # the rest is what greedy decoding gives from the answer's head, and only the rest counts as generated
    rest = run_search([replace(problem, prompt=problem.prompt + policy.tokenizer.decode(head))],
                      SearchConfig(strategy="greedy", max_new_tokens=10 - len(head)), policy)[0]
    assert fixed.best.completion == policy.tokenizer.decode(head) + rest.best.completion
    assert fixed.generated_tokens == rest.generated_tokens
    # a branch after a given point only
    (later,) = branch_points(policy, [problem], [answer], starts=[3])
    assert {b.position for b in later} == set(range(3, len(steps)))


def test_a_coupled_policys_later_rounds_repair_rejected_answers_and_never_repeat_one():
    from agent.refine import refine, tried
    from search import SearchConfig

    policy = _tiny_coupled_policy()  # untrained: never right, so every round runs
    problem = make_problem("1234", "5678", id="r")
    rounds = refine(problem, policy, SearchConfig(strategy="greedy", max_new_tokens=7), rounds=4, task=get_task("addition"))
    assert len(rounds) == 4 and not any(x.best.verified for x in rounds)
    answers = [answer_key(get_task("addition"), problem, x.best.completion) for x in rounds]
    assert len(set(answers)) == 4  # never an answer already rejected
    how = [t["how"] for t in tried(rounds)]
    assert how[0] == "search" and all(h.startswith("repair") for h in how[1:])
    # round 1 repaired round 0's answer at its smallest margin: the same tokens before the branch, another at it
    branch, before = rounds[1].branch, rounds[0].best.token_ids
    assert rounds[1].best.token_ids[: branch.position] == before[: branch.position]
    assert rounds[1].best.token_ids[branch.position] != before[branch.position]
