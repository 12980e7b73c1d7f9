"""Every strategy by name, and the one entry point that runs a search: fn(problems, cfg, policy) -> results."""

from search.beam import beam
from search.best_of_n import best_of_n
from search.diverse_beam import diverse_beam
from search.greedy import greedy
from search.mcts import mcts
from search.step_beam import step_beam
from search.types import SearchConfig, SearchResult

STRATEGIES = {
    "greedy": greedy,
    "best_of_n": best_of_n,
    "beam": beam,
    "step_beam": step_beam,
    "diverse_beam": diverse_beam,
    "mcts": mcts,
}


def run_search(problems, cfg: SearchConfig, policy) -> list[SearchResult]:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {cfg.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](problems, cfg, policy)
