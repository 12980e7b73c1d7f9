"""String reversal: write a word of lowercase letters backwards.

    prompt  "abcd<"    completion "dcba"

Difficulty = the word's length. Its label checks differ in kind from addition's (an invariance and a
decomposition over the operands): reversal is its own inverse, so a proposed answer is checked by asking the
policy to reverse it back (a round trip), and reversal of a concatenation is the concatenation of the halves'
reversals in swapped order (a decomposition onto shorter, already mastered words).
"""

from __future__ import annotations

import random
from functools import partial
from typing import Callable

from tasks.base import LabelCheck, LabelProposal, PositionCoupling, Problem, Solve, Task, solve_cuts

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_problem(word: str, split: str = "train", id: str = "") -> Problem:
    return Problem(prompt=f"{word}<", answer=word[::-1], checker="exact", task="reversal", split=split, id=id,
                   difficulty=len(word))


def word_of(problem: Problem) -> str:
    return problem.prompt[:-1]


# the word's letters count back from its end, so its last letter and the answer's first share a position
COUPLING = PositionCoupling(operand_chars=LETTERS, separator="<", order="backward")


class Reversal(Task):
    name = "reversal"
    min_difficulty = 1
    coupling = COUPLING

    def generate(self, difficulty: int, n: int, seed: int, split: str = "train") -> list[Problem]:
        # train and held-out draw from different streams, as addition's do
        rng = random.Random(f"reversal/{split}/{difficulty}/{seed}")
        return [make_problem("".join(rng.choice(LETTERS) for _ in range(difficulty)), split,
                             id=f"rev-{split}-d{difficulty}-s{seed}-{i}") for i in range(n)]

    def extract(self, problem: Problem, completion: str) -> str | None:
        text = completion.strip()
        return text if len(text) == len(word_of(problem)) and all(c in LETTERS for c in text) else None

    def max_new_tokens(self, difficulty: int) -> int:
        return difficulty + 2

    def label_checks(self) -> dict[str, LabelCheck]:
        return {"round_trip": round_trip_check, "halves": halves_check}

    def label_proposals(self) -> dict[str, LabelProposal]:
        # two cuts, as addition's: a label needs both to agree, so one wrong part (a length the policy is unsure at)
        # seldom writes it; without proposals a length where the policy writes no well-formed answer gets no label
        # at all (seed 0 stuck at 19 letters, docs/benchmarks.md)
        return {"halves": partial(compose, split_at=lambda n: n // 2),
                "halves_plus_one": partial(compose, split_at=lambda n: n // 2 + 1)}


def round_trip_check(problems: list[Problem], answers: list[str], solve: Solve) -> list[bool]:
    """Reversal undoes itself: the policy's reversal of the proposed answer must give back the word."""
    back = solve([make_problem(answer) for answer in answers])
    return [got.strip() == word_of(p) for p, got in zip(problems, back)]


def compose(problems: list[Problem], solve: Solve, split_at: Callable[[int], int]) -> list[str | None]:
    """Each word's reversal from the policy's own reversals of its two parts (the first `split_at(n)` letters and
    the rest), joined in swapped order. None where a part's answer is malformed or the word has no shorter parts."""
    cuts = []
    for p in problems:
        word = word_of(p)
        k = split_at(len(word))
        cuts.append((make_problem(word[:k]), make_problem(word[k:])) if 1 <= k < len(word) else None)
    out = []
    for cut, answers in zip(cuts, solve_cuts(cuts, solve)):
        if cut is None:
            out.append(None)
            continue
        low, high = (Reversal().extract(part, answer) for part, answer in zip(cut, answers))
        out.append(high + low if low is not None and high is not None else None)
    return out


def halves_check(problems: list[Problem], answers: list[str], solve: Solve) -> list[bool]:
    """reverse(x + y) == reverse(y) + reverse(x): the policy's answers on the two halves (shorter words), joined
    in swapped order, must equal the proposed answer. Words of one letter have nothing shorter to check against."""
    composed = compose(problems, solve, lambda n: n // 2)
    return [len(word_of(p)) < 2 or c == answer for p, answer, c in zip(problems, answers, composed)]
