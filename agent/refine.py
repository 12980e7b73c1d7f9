"""Iterative refinement: search, show the policy its best attempt and the verdict, search again.

Round 0 searches the problem's own prompt. Round r >= 1 searches a prompt that holds the best attempt so far
and its feedback, with the problem last so that the completion continues the problem as in round 0:

    # attempt: 0721
    # feedback: rejected by the exact checker
    1234+5678=

The feedback is the checker's verdict when the problem carries an answer, otherwise the search's confidence
(never the answer itself). The loop stops at the first verified attempt or after `rounds` rounds. Plain
functions over agent.solve, callable without a broker; agent/jobs.py records the rounds, each linked to
the attempt it refined.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from agent.solve import solve, trajectory_rows
from tasks import Problem
from search import Candidate, SearchConfig, SearchResult


def feedback(problem: Problem, attempt: Candidate) -> str:
    """What round r+1 is told about an attempt: the checker's verdict, or the confidence verdict without one."""
    if attempt.verified is None:
        return f"unchecked; confidence {attempt.mean_logprob:.2f} mean log-prob per token"
    return f"{'accepted' if attempt.verified else 'rejected'} by the {problem.checker} checker"


def round_prompt(problem: Problem, attempt: Candidate) -> str:
    return f"# attempt: {attempt.completion.strip()}\n# feedback: {feedback(problem, attempt)}\n{problem.prompt}"


def _better(a: Candidate, b: Candidate | None) -> bool:
    # a verified attempt beats any unverified one; otherwise the search's own score decides
    return b is None or (bool(a.verified), a.score) > (bool(b.verified), b.score)


def refine(problem: Problem, policy, cfg: SearchConfig, rounds: int,
           on_round: Callable[[int, SearchResult], None] | None = None) -> list[SearchResult]:
    """Search up to `rounds` rounds; returns one SearchResult per round searched (round 0 first).

    Each result's `problem` is the round's problem (its prompt is the round's prompt; id, answer and checker are
    the original's), so every candidate is verified against the original answer.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (got rounds={rounds})")
    results: list[SearchResult] = []
    best: Candidate | None = None
    for r in range(rounds):
        asked = problem if best is None else replace(problem, prompt=round_prompt(problem, best))
        result = solve([asked], policy, cfg)[0]
        results.append(result)
        if on_round is not None:
            on_round(r, result)
        if _better(result.best, best):
            best = result.best
        if best.verified:
            break
    return results


def refine_rows(problem: Problem, results: list[SearchResult], job_id: str | None = None) -> tuple[list[list[dict]], list[int | None]]:
    """Trajectory rows per round, and per round the earlier round whose best attempt its prompt showed (None for
    round 0); the store links them through `parent_id`. Only the job's overall best is marked `is_best` (the one
    training uses, paired with the problem's own prompt); a round's own prompt is kept in `prompt`."""
    per_round, parents = [], []
    best, at = None, None
    for r, result in enumerate(results):
        rows = trajectory_rows(result, job_id=job_id, round=r)
        for row in rows:
            row["is_best"] = False
            row["prompt"] = None if result.problem.prompt == problem.prompt else result.problem.prompt
        per_round.append(rows)
        parents.append(at)
        if _better(result.best, best):
            best, at = result.best, r
    if results:
        per_round[at][0]["is_best"] = True  # rows are ranked best first
    return per_round, parents


def best_of_rounds(results: list[SearchResult]) -> tuple[Candidate, int]:
    """The best attempt over all rounds and the round that produced it."""
    best, at = None, 0
    for r, result in enumerate(results):
        if _better(result.best, best):
            best, at = result.best, r
    return best, at
