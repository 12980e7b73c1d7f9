"""Best-of-N: N samples per problem from one shared prefill, ranked by verifier (if allowed) and confidence."""

from __future__ import annotations

from tasks import Problem
from search.sampling import sample_and_rank
from search.config import SearchConfig
from search.types import SearchPolicy, SearchResult


def best_of_n(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    return sample_and_rank(problems, cfg, policy, n=cfg.n, temperature=cfg.temperature, strategy="best_of_n")
