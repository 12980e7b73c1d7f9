"""A job's search: problems past the policy's trained window go through the context memory, and every candidate
becomes a trajectory row with the best one marked.

Plain functions, callable without a broker; agent/jobs.py records the rows, the Celery tasks in workers/ wrap it.
"""

from __future__ import annotations

from dataclasses import replace

from memory.context import exceeds_window
from tasks import Problem
from search import SearchConfig, SearchResult, run_search, traits_of
from search.prompt_format import formatted_problems


def trajectory_rows(
    result: SearchResult, job_id: str | None = None, cycle: int | None = None, round: int = 0
) -> list[dict]:
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


def search_problems(problems: list[Problem], policy, cfg: SearchConfig) -> list[SearchResult]:
    """Search every problem (the caller records the trajectories: agent/jobs.py, agent/loop.py).

    A problem whose prompt and completion would run past the policy's trained window is searched through the
    context memory (SearchConfig.memory) when the model can run it: long statements in submitted jobs and the
    history a refinement job accumulates. A model asked past its trained length otherwise fails."""
    if cfg.memory or cfg.recycling or not traits_of(cfg.strategy).memory or not problems:
        return run_search(problems, cfg, policy)
    shown = formatted_problems(problems, cfg.prompt_format_for(policy), policy.tokenizer)  # what the model reads
    lengths = [len(ids) for ids in policy.tokenizer([p.prompt for p in shown], add_special_tokens=False).input_ids]
    long = [exceeds_window(policy.model, n + cfg.max_new_tokens) for n in lengths]
    if not any(long):
        return run_search(problems, cfg, policy)
    results: list[SearchResult | None] = [None] * len(problems)
    for flag, group_cfg in ((False, cfg), (True, replace(cfg, memory=True))):
        at = [i for i, is_long in enumerate(long) if is_long == flag]
        if at:
            for i, r in zip(at, run_search([problems[i] for i in at], group_cfg, policy)):
                results[i] = r
    return results
