"""Solving one problem: search, verify, record every candidate with the best one marked.

Plain functions, callable without a broker; the Celery tasks in workers/ are thin wrappers over them.
"""

from __future__ import annotations

from tasks import Problem
from search import SearchConfig, SearchResult, run_search


def trajectory_rows(result: SearchResult, job_id: str | None = None, cycle: int | None = None, round: int = 0) -> list[dict]:
    rows = []
    for i, c in enumerate(result.candidates):
        rows.append(dict(
            problem_id=result.problem.id, job_id=job_id, cycle=cycle, round=round, completion=c.completion,
            token_count=len(c.token_ids), mean_logprob=c.mean_logprob, min_logprob=c.min_logprob,
            mean_entropy=c.mean_entropy, score=c.score, verified=c.verified,
            policy_version=result.policy_version, strategy=result.strategy, is_best=(i == 0),
            search_stats={"generated_tokens": result.generated_tokens, "forward_passes": result.forward_passes},
        ))
    return rows


def solve(problems: list[Problem], policy, cfg: SearchConfig) -> list[SearchResult]:
    """Search every problem (the caller records the trajectories: agent/jobs.py, agent/loop.py)."""
    return run_search(problems, cfg, policy)
