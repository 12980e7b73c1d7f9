"""Search over a policy's completions. Every strategy: fn(problems, cfg, policy) -> list[SearchResult]."""

from search.best_of_n import best_of_n
from search.greedy import greedy
from search.types import Candidate, SearchConfig, SearchResult

STRATEGIES = {"greedy": greedy, "best_of_n": best_of_n}


def run_search(problems, cfg: SearchConfig, policy) -> list[SearchResult]:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {cfg.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](problems, cfg, policy)


__all__ = ["STRATEGIES", "Candidate", "SearchConfig", "SearchResult", "run_search"]
