"""Task families as plugins: the registry (built-ins, `module:Class` named by the operator, entry points) and
the built-in reversal family with its own label checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import TASKS, Problem, allow, get_task, names
from tasks.reversal import Reversal, make_problem


def _perfect(problems):
    """A solver that reverses correctly: what a policy that mastered shorter words answers."""
    return [p.prompt[:-1][::-1] for p in problems]


def test_reversal_is_builtin_with_checks_of_its_own_kind():
    task = get_task("reversal")
    assert isinstance(task, Reversal) and "reversal" in TASKS and task.name == "reversal"
    problems = task.generate(6, 20, seed=0)
    assert all(p.task == "reversal" and p.difficulty == 6 and p.answer == p.prompt[:-1][::-1] for p in problems)
    assert not {p.prompt for p in problems} & {p.prompt for p in task.generate(6, 20, seed=0, split="heldout")}
    checks = task.label_checks()
    assert list(checks) == ["round_trip", "halves"]
    right = [p.answer for p in problems]
    wrong = [a[1:] + a[0] for a in right]  # a rotation: right letters, wrong order
    for name, check in checks.items():
        assert check(problems, right, _perfect) == [True] * 20, name
        assert sum(check(problems, wrong, _perfect)) <= 2, name  # only a word whose rotation equals it passes
    # the round trip asks about the answer, the halves about shorter words: different problems reach the solver
    asked = []
    checks["round_trip"]([make_problem("abcd")], ["dcba"], lambda ps: asked.append([p.prompt for p in ps]) or _perfect(ps))
    checks["halves"]([make_problem("abcd")], ["dcba"], lambda ps: asked.append([p.prompt for p in ps]) or _perfect(ps))
    assert asked == [["dcba<"], ["ab<", "cd<"]]
    assert task.extract(problems[0], " " + right[0] + "\n") == right[0] and task.extract(problems[0], "ab1") is None


def test_reversal_proposes_a_label_from_its_halves_only_where_both_cuts_agree():
    proposals = get_task("reversal").label_proposals()
    assert list(proposals) == ["halves", "halves_plus_one"]
    words = [make_problem("abcde"), make_problem("xy"), make_problem("q")]
    asked = []

    def solver(ps):
        asked.append([p.prompt for p in ps])
        return _perfect(ps)

    assert proposals["halves"](words, solver) == ["edcba", "yx", None]  # one letter: nothing shorter to ask
    assert asked == [["ab<", "cde<", "x<", "y<"]]
    assert proposals["halves_plus_one"](words, _perfect) == ["edcba", None, None]  # "xy" cut after 2: no second part

    # a part the policy gets wrong writes a wrong label at one cut only; a malformed part writes none
    def wrong_on_cde(ps):
        return ["xdc" if p.prompt == "cde<" else "9" if p.prompt == "de<" else a for p, a in zip(ps, _perfect(ps))]

    assert proposals["halves"](words[:1], wrong_on_cde) == ["xdcba"]
    assert proposals["halves_plus_one"](words[:1], wrong_on_cde) == [None]


PACKAGE = Path(__file__).parent / "plugins" / "rot13_package"  # a task package outside Arbor


def test_a_module_class_task_is_usable_once_the_operator_names_it(monkeypatch):
    monkeypatch.syspath_prepend(str(PACKAGE))
    spec = "arbor_rot13:Rot13"
    with pytest.raises(ValueError, match="module:Class task must be named with --task"):
        get_task(spec)
    assert spec not in names()
    assert allow(spec) == spec and spec in names()
    task = get_task(spec)
    assert task.name == spec and task.generate(3, 2, seed=1)[0].task == spec
    problem = task.generate(3, 1, seed=1)[0]
    assert task.label_checks()["inverse"]([problem], [problem.answer],
                                          lambda ps: [__import__("codecs").encode(p.prompt[:-1], "rot13") for p in ps]) == [True]


@pytest.mark.parametrize("spec, message", [
    ("nosuchmodule_xyz:Task", "cannot import 'nosuchmodule_xyz'"),
    ("tasks.reversal:Missing", "has no 'Missing'"),
    ("tasks.reversal:LabelCheck", "is not an arbor Task subclass"),
    ("justaname", "unknown task 'justaname'"),
])
def test_a_bad_task_name_is_one_clear_line(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        allow(spec)
    assert "\n" not in str(err.value)


def test_a_problem_file_cannot_import_a_module_by_naming_it(tmp_path):
    from tasks.jsonl import read_problems

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x", "task": "os:system"}\n{"prompt": "abc<", "task": "reversal"}\n')
    problems, errors = read_problems(path, known_tasks=names())
    assert [p.task for p in problems] == ["reversal"]
    assert len(errors) == 1 and "'os:system': not a known task" in errors[0].message
    assert all(p.task != "os:system" for p in problems) and Problem("x").task is None


def test_addition_decompositions_write_every_answer_from_the_policys_shorter_sums():
    """Both split points compose the true sum from a solver that is right on shorter problems, carries included,
    and ask it nothing as long as the problem; a wrong sub-answer never composes the true sum, and a malformed
    one composes nothing."""
    from tasks.addition import compose, make_problem

    addition = get_task("addition")
    problems = [p for d in range(2, 13) for p in addition.generate(d, 30, seed=d)] + [make_problem("9999", "1999")]
    asked = []

    def oracle(ps):
        asked.extend(ps)
        return [p.answer for p in ps]

    for name, propose in addition.label_proposals().items():
        asked.clear()
        proposed = propose(problems, oracle)
        assert all(c == p.answer for c, p in zip(proposed, problems) if c is not None), name
        assert sum(c is None for c in proposed) <= 30, name  # only where a split point leaves no shorter part (d=2)
        assert max(p.difficulty for p in asked) < max(p.difficulty for p in problems), name
    carried = make_problem("9999", "1999")  # least significant digit first: the low halves 99 + 19 carry
    high_wrong = lambda ps: [p.answer[::-1] if p.prompt == "99+99=" else p.answer for p in ps]  # 891 read as 198
    assert compose([carried], oracle, lambda d: d // 2) == [carried.answer]
    assert compose([carried], high_wrong, lambda d: d // 2) != [carried.answer]
    assert compose([carried], lambda ps: ["x"] * len(ps), lambda d: d // 2) == [None]
    assert compose([carried], lambda ps: [p.answer[:-1] + "7" for p in ps], lambda d: d // 2) == [None]  # no carry is 7
    assert compose([make_problem("5", "4")], oracle, lambda d: d // 2) == [None]  # nothing shorter to ask


def test_addition_checks_a_label_against_a_twin_with_other_digits_and_the_same_sum():
    """same_sum asks the solver a problem of the same length with the same sum and other operands (the same twin
    every time), so it passes right answers and fails a mistake the solver does not repeat on the twin; the
    self-verified rate uses split alone."""
    from tasks.addition import _value, operands, same_sum_check, same_sum_twin

    addition = get_task("addition")
    problems = [p for d in (1, 3, 8, 20) for p in addition.generate(d, 25, seed=d)]
    twins = [same_sum_twin(p) for p in problems]
    assert twins == [same_sum_twin(p) for p in problems]
    for p, t in zip(problems, twins):
        assert t.difficulty == p.difficulty and t.answer == p.answer
        assert sum(map(_value, operands(t))) == sum(map(_value, operands(p)))
    assert sum(t.prompt != p.prompt for p, t in zip(problems, twins)) >= 70  # a twin is another problem
    asked = []

    def oracle(ps):
        asked.extend(ps)
        return [p.answer for p in ps]

    right = [p.answer for p in problems]
    wrong = [a[:-1] + str((int(a[-1]) + 1) % 10) for a in right]  # the most significant digit off by one
    assert same_sum_check(problems, right, oracle) == [True] * len(problems)
    assert [p.prompt for p in asked] == [t.prompt for t in twins]
    assert same_sum_check(problems, wrong, oracle) == [False] * len(problems)
    # a solver that repeats its own mistake on every problem of that sum passes it: what the check cannot see
    repeat = lambda ps: [a[:-1] + str((int(a[-1]) + 1) % 10) for a in (p.answer for p in ps)]  # noqa: E731
    assert same_sum_check(problems, wrong, repeat) == [True] * len(problems)
    assert list(addition.label_checks()) == ["split", "same_sum"]
    assert list(addition.self_verification_checks()) == ["split"]
    assert get_task("reversal").self_verification_checks().keys() == get_task("reversal").label_checks().keys()
