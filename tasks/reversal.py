"""String reversal: write a word of lowercase letters backwards.

    prompt  "abcd<"    completion "dcba"

Difficulty = the word's length. Its label checks differ in kind from addition's (an invariance and a
decomposition over the operands): reversal is its own inverse, so a proposed answer is checked by asking the
policy to reverse it back (a round trip), and reversal of a concatenation is the concatenation of the halves'
reversals in swapped order (a decomposition onto shorter, already mastered words).
"""

from __future__ import annotations

import random

from tasks.base import LabelCheck, PositionCoupling, Problem, Solve, Task

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


def round_trip_check(problems: list[Problem], answers: list[str], solve: Solve) -> list[bool]:
    """Reversal undoes itself: the policy's reversal of the proposed answer must give back the word."""
    back = solve([make_problem(answer) for answer in answers])
    return [got.strip() == word_of(p) for p, got in zip(problems, back)]


def halves_check(problems: list[Problem], answers: list[str], solve: Solve) -> list[bool]:
    """reverse(x + y) == reverse(y) + reverse(x): the policy's answers on the two halves (shorter words), joined
    in swapped order, must equal the proposed answer. Words of one letter have nothing shorter to check against."""
    halves = []
    for p in problems:
        word = word_of(p)
        k = len(word) // 2
        if len(word) >= 2:
            halves += [make_problem(word[:k]), make_problem(word[k:])]
    solved = iter(solve(halves) if halves else [])
    out = []
    for p, answer in zip(problems, answers):
        if len(word_of(p)) < 2:
            out.append(True)
            continue
        low, high = next(solved).strip(), next(solved).strip()
        out.append(high + low == answer)
    return out
