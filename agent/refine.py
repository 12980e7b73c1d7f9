"""Iterative refinement: search, show the policy its attempts and the verdicts, search again.

Round 0 searches the problem's own prompt. Round r >= 1 searches a prompt that holds every earlier round's best
attempt and its feedback, oldest first, with the problem last so that the completion continues the problem as
in round 0:

    # attempt: 0721
    # feedback: rejected by the exact checker
    # attempt: 0821
    # feedback: rejected by the exact checker
    1234+5678=

The feedback is the checker's verdict when the problem carries an answer, otherwise the search's confidence
(never the answer itself). The loop stops at the first verified attempt or after `rounds` rounds. The history
grows with the rounds; once it runs past the policy's trained window, agent.job_search searches it through the
context memory. Plain functions over agent.job_search, callable without a broker; agent/jobs.py records the rounds,
each linked to the best earlier attempt it refined.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from agent.job_search import search_problems, trajectory_rows
from tasks import Problem
from search import Candidate, SearchConfig, SearchResult


def feedback(problem: Problem, attempt: Candidate) -> str:
    """What round r+1 is told about an attempt: the checker's verdict, or the confidence verdict without one."""
    if attempt.verified is None:
        return f"unchecked; confidence {attempt.mean_logprob:.2f} mean log-prob per token"
    return f"{'accepted' if attempt.verified else 'rejected'} by the {problem.checker} checker"


def round_prompt(problem: Problem, *attempts: Candidate) -> str:
    """The problem after the attempts so far (oldest first), each with its feedback."""
    history = "".join(f"# attempt: {a.completion.strip()}\n# feedback: {feedback(problem, a)}\n" for a in attempts)
    return history + problem.prompt


def _better(a: Candidate, b: Candidate | None) -> bool:
    # a verified attempt beats any unverified one; otherwise the search's own score decides
    return b is None or (bool(a.verified), a.score) > (bool(b.verified), b.score)


def refine(problem: Problem, policy, cfg: SearchConfig, rounds: int,
           on_round: Callable[[int, SearchResult], None] | None = None) -> list[SearchResult]:
    """Search up to `rounds` rounds; returns one SearchResult per round searched (round 0 first).

    Each result's `problem` is the round's problem (its prompt is the round's prompt; id, answer and checker are
    the original's), so every candidate is verified against the original answer.
    """
    each = None if on_round is None else (lambda r, results: on_round(r, results[0]))
    return refine_many([problem], policy, cfg, rounds, each)[0]


def refine_many(problems: list[Problem], policy, cfg: SearchConfig, rounds: int,
                on_round: Callable[[int, list[SearchResult]], None] | None = None) -> list[list[SearchResult]]:
    """`refine` for many problems at once: each round searches every problem still unsolved in one batch.
    `on_round(r, results)` hears the round's results (the problems still going, in order)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (got rounds={rounds})")
    results: list[list[SearchResult]] = [[] for _ in problems]
    best: list[Candidate | None] = [None] * len(problems)
    going = list(range(len(problems)))
    for r in range(rounds):
        # each round's prompt shows every earlier round's best attempt, oldest first
        asked = [
            (
                problems[i]
                if r == 0
                else replace(problems[i], prompt=round_prompt(problems[i], *(x.best for x in results[i])))
            )
            for i in going
        ]
        found = search_problems(asked, policy, cfg)
        if on_round is not None:
            on_round(r, found)
        for i, result in zip(going, found):
            results[i].append(result)
            if _better(result.best, best[i]):
                best[i] = result.best
        going = [i for i in going if not best[i].verified]
        if not going:
            break
    return results


def refine_rows(
    problem: Problem, results: list[SearchResult], job_id: str | None = None
) -> tuple[list[list[dict]], list[int | None]]:
    """Trajectory rows per round, and per round the earlier round whose attempt it refined: the best one its
    prompt showed (None for round 0); the store links them through `parent_id`. Only the job's overall best is
    marked `is_best` (the one training uses, paired with the problem's own prompt); a round's own prompt is kept
    in `prompt`."""
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


def refinement_examples(results: list[SearchResult], round_prompts: list[str | None]) -> list[dict]:
    """Training examples from refinement: a result whose best attempt verified in a later round (its round prompt is
    given: it holds the earlier attempts and their feedback) becomes {round prompt, attempt}."""
    return [{"prompt": prompt, "completion": r.best.completion}
            for r, prompt in zip(results, round_prompts) if prompt is not None and r.best.verified]


def best_of_rounds(results: list[SearchResult]) -> tuple[Candidate, int]:
    """The best attempt over all rounds and the round that produced it."""
    best, at = None, 0
    for r, result in enumerate(results):
        if _better(result.best, best):
            best, at = result.best, r
    return best, at
