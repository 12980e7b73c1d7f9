"""Multi-digit addition, written least significant digit first so that an answer digit only depends on the
digits already written (and so that the built-in model's position coupling applies).

    prompt  "a0a1..a(d-1)+b0b1..b(d-1)="    completion "s0s1..sd"   (always d+1 digits, zero-padded)

Difficulty = d, the number of digits of each operand.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Callable

from tasks.base import LabelCheck, LabelProposal, PositionCoupling, Problem, Solve, Task, solve_cuts


def _rev(n: int, width: int) -> str:
    return str(n).zfill(width)[::-1]


def _value(digits_lsb_first: str) -> int:
    return int(digits_lsb_first[::-1])


def make_problem(a: str, b: str, split: str = "train", id: str = "") -> Problem:
    """A problem from two operand strings already written least significant digit first."""
    d = len(a)
    answer = _rev(_value(a) + _value(b), d + 1)
    return Problem(prompt=f"{a}+{b}=", answer=answer, checker="exact", task="addition", split=split, id=id, difficulty=d)


def operands(problem: Problem) -> tuple[str, str]:
    a, b = problem.prompt.rstrip("=").split("+")
    return a, b


# digit i of both operands and answer digit i share a position (operands least significant digit first)
COUPLING = PositionCoupling(operand_chars="0123456789", separator="=", joiner="+", order="forward")


class Addition(Task):
    name = "addition"
    min_difficulty = 1
    coupling = COUPLING

    def generate(self, difficulty: int, n: int, seed: int, split: str = "train") -> list[Problem]:
        # train and held-out draw from different streams, so they never share a problem by construction
        rng = random.Random(f"addition/{split}/{difficulty}/{seed}")
        out = []
        for i in range(n):
            a = "".join(rng.choice("0123456789") for _ in range(difficulty))
            b = "".join(rng.choice("0123456789") for _ in range(difficulty))
            out.append(make_problem(a, b, split, id=f"add-{split}-d{difficulty}-s{seed}-{i}"))
        return out

    def extract(self, problem: Problem, completion: str) -> str | None:
        text = completion.strip()
        d = len(operands(problem)[0])
        return text if len(text) == d + 1 and text.isdigit() else None

    def max_new_tokens(self, difficulty: int) -> int:
        return difficulty + 3

    def label_checks(self) -> dict[str, LabelCheck]:
        # Commutativity (b+a must agree) was dropped: after split it removed a median 3% (at most 19%) of the labels
        # and raised their precision by at most 0.010 (33 measured cycles), yet cost a full-length greedy solve per
        # label in selection and in every self-verified evaluation, and held the self-verified rate near accuracy squared.
        # same_sum after split: a wrong answer that passes split repeats the policy's own mistake in a half (the low
        # half is the same first digits at the same positions); its twin (other digits, the same sum) rarely gets
        # the same wrong answer too. On one 43-digit policy split alone passed 5 of 61 wrong answers at 44 digits,
        # both checks none; on another split alone passed none (bench/label_checks.py, docs/benchmarks.md)
        return {"split": split_check, "same_sum": same_sum_check}

    def self_verification_checks(self) -> dict[str, LabelCheck]:
        # the self-verified rate estimates accuracy: split alone kept it within 0.02 of it at 44 digits, where a
        # second full-length answer holds it near accuracy squared (0.68 against 0.80)
        return {"split": split_check}

    def label_proposals(self) -> dict[str, LabelProposal]:
        # two split points: a label needs both to agree, which catches a wrong part that only one of them asks; a
        # part hard for one cut is often hard for the other, hence the mastery guard (SelectConfig.proposal_mastery)
        return {"split_half": partial(compose, split_at=lambda d: d // 2),
                "split_half_plus_one": partial(compose, split_at=lambda d: d // 2 + 1)}


def _answer(problem: Problem, completion: str) -> str | None:
    return Addition().extract(problem, completion)


def compose(problems: list[Problem], solve: Solve, split_at: Callable[[int], int]) -> list[str | None]:
    """Each problem's answer from the policy's own answers to shorter problems: the low digits (the first
    `split_at(d)` of each operand) and the high digits, joined through the low sum's carry digit (the high sum
    plus that 0 or 1). None where a part is malformed or a problem has no shorter parts.

    The carry is added here rather than asked of the policy as `high + 1`: that second operand (a 1 and zeros) is
    far from the problems it learns, and a policy measured 8-14% wrong on it against 6% on ordinary parts."""
    cuts = []
    for p in problems:
        a, b = operands(p)
        k = split_at(len(a))
        cuts.append((make_problem(a[:k], b[:k]), make_problem(a[k:], b[k:])) if 1 <= k < len(a) else None)
    out = []
    for cut, answers in zip(cuts, solve_cuts(cuts, solve)):
        if cut is None:
            out.append(None)
            continue
        low, high = _answer(cut[0], answers[0]), _answer(cut[1], answers[1])
        if low is None or high is None or low[-1] not in "01":
            out.append(None)
            continue
        width = len(high)
        high_plus_carry = str(int(high[::-1]) + int(low[-1])).zfill(width)[::-1]
        out.append(low[:-1] + high_plus_carry if len(high_plus_carry) == width else None)
    return out


def split_check(problems: list[Problem], answers: list[str], solve: Solve) -> list[bool]:
    """Decomposition: the answer composed from the policy's own answers on the low and high halves (shorter,
    already mastered lengths; see compose) must equal the proposed answer. Errors at a new length are systematic
    (the same wrong answer under resampling or swapping), but the halves move the work to lengths the policy
    masters, so this check stays exact as lengths grow (it kept pseudo-label precision at 99-100%)."""
    composed = compose(problems, solve, lambda d: d // 2)
    return [len(operands(p)[0]) < 2 or c == answer for p, answer, c in zip(problems, answers, composed)]


def same_sum_twin(problem: Problem) -> Problem:
    """A problem of the same length whose operands are other digits with the same sum, drawn from the problem
    itself (the same twin every time it is asked)."""
    a, b = operands(problem)
    width, total = len(a), _value(a) + _value(b)
    largest = 10 ** width - 1
    x = random.Random(f"same_sum/{problem.prompt}").randint(max(0, total - largest), min(largest, total))
    return make_problem(_rev(x, width), _rev(total - x, width))


def same_sum_check(problems: list[Problem], answers: list[str], solve: Solve) -> list[bool]:
    """Rewriting: the policy's answer to the problem's same-sum twin (same_sum_twin) must equal the proposed answer.
    The twin's digits, and so its carries, differ everywhere, so a mistake tied to the operands' digits is not
    repeated there, where split's low half repeats the same digits at the same positions."""
    twins = [same_sum_twin(p) for p in problems]
    return [_answer(t, c) == answer for t, c, answer in zip(twins, solve(twins), answers)]
