"""Problems, checkers and the registry of built-in task families."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

SPLITS = ("train", "heldout")
MAX_ID_CHARS = 200  # the store's problem id column
MAX_TASK_CHARS = 80  # the store's task column
MAX_JOB_ID_CHARS = 64  # the store's job id column


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

    def content(self) -> dict:
        """Everything that makes the problem what it is (all but its id): two problems with one id must agree here."""
        return {"prompt": self.prompt, "answer": self.answer, "checker": self.checker, "task": self.task,
                "split": self.split, "difficulty": self.difficulty, "meta": self.meta or {}}

    def content_id(self) -> str:
        """A stable id from the content alone: the same problem gets the same id in any file, a different one another."""
        blob = json.dumps(self.content(), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return "p-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


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


@lru_cache(maxsize=1024)
def compile_regex(pattern: str):
    """A regex answer compiled with RE2 (linear time: no pattern can backtrack forever); ValueError names what is wrong.

    RE2 has no backreferences or lookarounds; '.' matches newlines too, as re.DOTALL."""
    import re2

    options = re2.Options()
    options.log_errors = False
    options.dot_nl = True
    options.max_mem = 8 << 20  # a pattern whose automaton needs more is refused, not built
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"is not a pattern RE2 accepts ({detail}; no backreferences or lookarounds)") from None


def _regex(completion: str, answer: str) -> bool:
    # the answer is a pattern the whole completion must match; matched by RE2 in linear time, never executed
    try:
        pattern = compile_regex(answer)
    except ValueError:
        return False  # validated when the problem was read; a stored bad pattern verifies nothing
    return pattern.fullmatch(completion.strip()) is not None


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
# a label proposal: (problems, solve) -> a completion per problem built only from the policy's own answers to
# smaller problems (a decomposition), or None where it cannot; batched like a check
LabelProposal = Callable[[list[Problem], Solve], list[str | None]]


def solve_cuts(cuts: list[tuple[Problem, Problem] | None], solve: Solve) -> list[tuple[str, str] | None]:
    """The policy's answers to each problem's two parts (a decomposition's cut), asked in one batch; None where a
    problem has no cut."""
    solved = iter(solve([part for cut in cuts if cut for part in cut]) if any(cuts) else [])
    return [None if cut is None else (next(solved), next(solved)) for cut in cuts]


@dataclass(frozen=True)
class PositionCoupling:
    """How a position-coupled built-in policy numbers this task's tokens (agent/policy.py): operand tokens
    (`operand_chars`) count within their run, forward from its start or backward from its end (`order`); the
    answer after `separator` counts forward; `joiner` (if any) separates operands. Chosen so that the token
    predicting answer token i shares its position with the operand tokens that answer token depends on: that
    geometry is the same at every length, which is what lets a policy trained on short problems solve longer
    ones."""

    operand_chars: str
    separator: str
    joiner: str | None = None
    order: str = "forward"


class Task:
    """A family of problems. Built-in families generate problems at a difficulty and may declare label
    checks: tests of a proposed answer that need no ground truth (decompositions, invariances) and belong to
    the task, since they use its structure."""

    name: str = ""
    min_difficulty: int = 1
    coupling: PositionCoupling | None = None  # for a fresh built-in policy; None: sequential positions

    def generate(self, difficulty: int, n: int, seed: int, split: str = "train") -> list[Problem]:
        raise NotImplementedError

    def extract(self, problem: Problem, completion: str) -> str | None:
        """The answer a completion states, or None when it is malformed (the format filter)."""
        return completion.strip() or None

    def label_checks(self) -> dict[str, LabelCheck]:
        """The task's own label checks by name, run in this order (none for a generic task)."""
        return {}

    def self_verification_checks(self) -> dict[str, LabelCheck]:
        """The checks of the self-verified rate, label-free runs' estimate of held-out accuracy (default: all the
        label checks). A task may leave out a check that makes labels more precise but holds the rate well below
        accuracy."""
        return self.label_checks()

    def label_proposals(self) -> dict[str, LabelProposal]:
        """Decompositions that write a label for a problem the search got wrong, from the policy's answers to
        smaller problems it has mastered. A label needs every proposal to state the same answer, so they should
        decompose differently (none for a generic task)."""
        return {}

    def max_new_tokens(self, difficulty: int) -> int:
        return 64
