"""Every strategy by name, and the one entry point that runs a search: fn(problems, cfg, policy) -> results."""

from tasks import Problem
from search.adaptive import adaptive, auto
from search.beam import beam
from search.best_of_n import best_of_n
from search.config import SearchConfig
from search.diverse_beam import diverse_beam
from search.greedy import greedy
from search.mcts import mcts
from search.prompt_format import formatted_problems
from search.step_beam import step_beam
from search.traits import traits_of
from search.types import SearchPolicy, SearchResult

# in the order of search/traits.py TRAITS, whose names they are
STRATEGIES = {
    "greedy": greedy,
    "best_of_n": best_of_n,
    "beam": beam,
    "step_beam": step_beam,
    "diverse_beam": diverse_beam,
    "mcts": mcts,
    "adaptive": adaptive,
    "auto": auto,
}


def run_search(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    traits_of(cfg.strategy)  # a name changed after the config was made fails here, in one line
    shown = formatted_problems(problems, cfg.prompt_format_for(policy), policy.tokenizer)
    results = STRATEGIES[cfg.strategy](shown, cfg, policy)
    for result, problem in zip(results, problems):
        result.problem = problem  # the problem as it was given, not as the policy read it
    return results
