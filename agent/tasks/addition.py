"""Multi-digit addition, written least significant digit first so that an answer digit only depends on the
digits already written (and so that the built-in model's position coupling applies).

    prompt  "a0a1..a(d-1)+b0b1..b(d-1)="    completion "s0s1..sd"   (always d+1 digits, zero-padded)

Difficulty = d, the number of digits of each operand.
"""

from __future__ import annotations

import random

from agent.tasks.base import Problem, Task


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


class Addition(Task):
    name = "addition"
    min_difficulty = 1

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

    def label_filters(self) -> list:
        from agent.select import SplitCheck, CommuteCheck

        return [CommuteCheck(), SplitCheck()]
