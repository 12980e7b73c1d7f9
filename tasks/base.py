"""Problems, checkers and the registry of built-in task families."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

SPLITS = ("train", "heldout")


@dataclass
class Problem:
    prompt: str
    answer: str | None = None
    checker: str = "exact"
    task: str | None = None
    split: str = "train"
    id: str = ""
    difficulty: int | None = None
    meta: dict = field(default_factory=dict)


def _exact(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def _numeric(completion: str, answer: str) -> bool:
    numbers = re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", completion)
    if not numbers:
        return False
    try:
        return abs(float(numbers[-1]) - float(answer)) <= 1e-6 * max(1.0, abs(float(answer)))
    except ValueError:
        return False


def _regex(completion: str, answer: str) -> bool:
    # the answer is a pattern the whole completion must match; matched, never executed
    return re.fullmatch(answer, completion.strip(), flags=re.DOTALL) is not None


CHECKERS: dict[str, Callable[[str, str], bool]] = {"exact": _exact, "numeric": _numeric, "regex": _regex}


def verify(problem: Problem, completion: str) -> bool | None:
    """The verifier: True/False when the problem carries an answer, None when it cannot be checked."""
    if problem.answer is None:
        return None
    return CHECKERS[problem.checker](completion, problem.answer)


# solve(problems) -> the policy's greedy completion text per problem: a label check's only access to the policy
Solve = Callable[[list[Problem]], list[str]]
# a label check: (problems, proposed answers, solve) -> which answers pass; batched so that one check issues one
# batched solve for all its sub-problems rather than a decode per problem
LabelCheck = Callable[[list[Problem], list[str], Solve], list[bool]]


class Task:
    """A family of problems. Built-in families generate problems at a difficulty and may declare label
    checks: tests of a proposed answer that need no ground truth (decompositions, invariances) and belong to
    the task, since they use its structure."""

    name: str = ""
    min_difficulty: int = 1

    def generate(self, difficulty: int, n: int, seed: int, split: str = "train") -> list[Problem]:
        raise NotImplementedError

    def extract(self, problem: Problem, completion: str) -> str | None:
        """The answer a completion states, or None when it is malformed (the format filter)."""
        return completion.strip() or None

    def label_checks(self) -> dict[str, LabelCheck]:
        """The task's own label checks by name, run in this order (none for a generic task)."""
        return {}

    def max_new_tokens(self, difficulty: int) -> int:
        return 64
