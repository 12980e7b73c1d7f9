"""Refinement examples from the search's own siblings, and their share of the training mix (the jobs' rounds:
tests/test_workers_unit.py)."""

from __future__ import annotations

import random

from agent.config import LoopConfig
from agent.loop import replay_mix
from agent.refine import MAX_SHOWN_ATTEMPTS, sibling_examples
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
