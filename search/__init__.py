"""Search over a policy's completions. Every strategy: fn(problems, cfg, policy) -> list[SearchResult].

The config and result types import no torch, so that configuration (the CLI's option defaults, a job's JSON)
is read without loading a model stack; the strategies, which do, load on first use of STRATEGIES or run_search.
"""

from search.types import Candidate, SearchConfig, SearchResult


def __getattr__(name: str):
    if name in ("STRATEGIES", "run_search"):
        from search import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")


__all__ = ["STRATEGIES", "Candidate", "SearchConfig", "SearchResult", "run_search"]
