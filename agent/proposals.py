"""Label proposals: a label for a problem the search got wrong, written from the policy's answers to the shorter
problems the task decomposes it into, and the solvers that decide which of those answers a proposal may use (trusted
lengths, checked parts). Selection (agent/select.py) calls them on the problems its filters dropped."""

from __future__ import annotations

import math

from agent.config import SelectConfig
from tasks import Solve, Task


class ProposedLabels:
    """The task's label proposals (decompositions into problems the policy has mastered) for the problems the
    filters before it dropped: a problem whose proposals all state the same answer is labelled with it. It
    reports the kept fraction and precision of everything kept so far, plus the problems it added."""

    name = "proposed"

    def __init__(self, proposals: dict):
        self.proposals = proposals

    def __call__(
        self, dropped: list, task: Task, solve: Solve, trusted_up_to: float | None = None,
        verify_parts: bool = False,
    ) -> list:
        """`trusted_up_to`: the longest difficulty at which the policy's answers to the parts are trusted (None: any;
        with `verify_parts`: none). `verify_parts`: an answer counts only where it passes the task's label checks
        (verified_past: one level deep where trusted, its own parts checked alike past it)."""
        if not dropped:
            return []
        problems = [p.result.problem for p in dropped]
        if verify_parts:
            solve = verified_past(solve, task, float("-inf") if trusted_up_to is None else trusted_up_to)
        elif trusted_up_to is not None:
            solve = trusted_only(solve, trusted_up_to)
        proposed = [propose(problems, solve) for propose in self.proposals.values()]
        added = []
        for i, p in enumerate(dropped):
            completions = [texts[i] for texts in proposed]
            answers = {task.extract(p.result.problem, c) if c is not None else None for c in completions}
            if len(answers) == 1 and None not in answers:
                p.answer, p.completion, p.contenders = answers.pop(), completions[0], []
                added.append(p)
        return added


def proposals_in_use(task: Task, cfg: SelectConfig) -> bool:
    """Whether label-free selection labels dropped problems by the task's decompositions."""
    return cfg.mode == "label_free" and cfg.use_task_proposals and bool(task.label_proposals())


def mastered_up_to(metric: dict, bar: float) -> float:
    """The longest difficulty up to which every difficulty `metric` holds reaches `bar`: from the easiest up to the
    first that falls short. `metric` is one evaluation's (the current policy's, at the lengths the cycle evaluated):
    a length it skips, below the frontier's window or between the report's lengths, neither breaks the prefix nor
    extends it with an older score (a score kept from an early cycle once stopped the prefix at 4 digits while the
    lengths up to 27 self-verified at 0.97-1.00). -inf when the easiest difficulty evaluated falls short."""
    bound = float("-inf")
    for difficulty in sorted(int(k) for k in metric if str(k).isdigit()):
        if metric[str(difficulty)] < bar:
            break
        bound = difficulty
    return bound


def trusted_only(solve: Solve, up_to: float) -> Solve:
    """`solve` that answers only problems of a difficulty up to `up_to`; any other gets an empty answer, which no task
    parses."""

    def trusted(p) -> bool:
        return p.difficulty is not None and p.difficulty <= up_to

    def run(problems):
        asked = [p for p in problems if trusted(p)]
        answers = iter(solve(asked) if asked else [])
        return [next(answers) if trusted(p) else "" for p in problems]

    return run


def verified_past(solve: Solve, task: Task, up_to: float) -> Solve:
    """`solve` whose answers stand only where they pass all the task's label checks; failures get "". Past
    difficulty `up_to` the checks' shorter sub-problems are answered by this solver, down to `up_to` or to lengths
    too short to split; up to it, and for a check's problem as long as the one it checks (addition's same-sum twin),
    by the policy as it is: one level of checks. For addition an answer equal to the sum of its verified halves is
    right whenever they are (bench/proposal_parts.py); a trusted length's answers are 1-3% wrong, and two splits'
    parts agreed on such mistakes (proposals 0.965 precise on a 43-digit policy, docs/benchmarks.md)."""
    checks = task.label_checks()

    def shorter_checked(length: float) -> Solve:
        if length <= up_to:
            return solve

        def route(problems):
            short = [p.difficulty is not None and p.difficulty < length for p in problems]
            answers = iter(checked([p for p, s in zip(problems, short) if s]) if any(short) else [])
            plain = iter(solve([p for p, s in zip(problems, short) if not s]) if not all(short) else [])
            return [next(answers) if s else next(plain) for s in short]
        return route

    def run(problems):
        answers = list(solve(problems))
        # an answer that does not parse fails at once, without its checks asking its parts
        parsed = [i for i, p in enumerate(problems) if task.extract(p, answers[i]) is not None]
        length_of = {i: math.inf if problems[i].difficulty is None else problems[i].difficulty for i in parsed}
        passed = set()
        for length in set(length_of.values()):
            group = [i for i in parsed if length_of[i] == length]
            # in order, each check on the answers the ones before it passed: a failed answer asks no more parts
            for check in checks.values():
                if not group:
                    break
                verdicts = check([problems[i] for i in group], [answers[i] for i in group], shorter_checked(length))
                group = [i for i, ok in zip(group, verdicts) if ok]
            passed |= set(group) if checks else set()
        return [a if i in passed else "" for i, a in enumerate(answers)]

    checked = memoized(run)
    return checked


def memoized(solve: Solve) -> Solve:
    """`solve` that answers each distinct prompt once however often it is asked (within one selection)."""
    answers: dict[str, str] = {}

    def run(problems):
        fresh = list({p.prompt: p for p in problems if p.prompt not in answers}.values())
        answers.update(zip((p.prompt for p in fresh), solve(fresh) if fresh else []))
        return [answers[p.prompt] for p in problems]

    return run
