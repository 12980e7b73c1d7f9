"""What each search strategy is, as data: the one place its name and properties are written down. The layers
above read them here (agent/select.py, agent/job_search.py, the CLI's and the API's strategy lists); the functions
that run each strategy are `search.STRATEGIES`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyTraits:
    # candidates are independent samples of the policy, so a repeated completion counts again (agent/select.py
    # votes by counts); other strategies' candidates are distinct paths, weighed by their probability
    samples: bool = False
    # can attend through the context memory (SearchConfig.memory); step_beam and mcts cannot: they copy key/value
    # segments between tree nodes, which a context memory does not hold
    memory: bool = False
    # ranks by the beam score (sum logprob / length**length_penalty) unless a scorer is named, as `generate` does
    beam_score: bool = False
    # ranks by this scorer unless one is named (adaptive: the value model, whose threshold is calibrated)
    default_scorer: str | None = None


TRAITS: dict[str, StrategyTraits] = {
    "greedy": StrategyTraits(memory=True),
    "best_of_n": StrategyTraits(samples=True, memory=True),
    "beam": StrategyTraits(memory=True, beam_score=True),
    "step_beam": StrategyTraits(),
    "diverse_beam": StrategyTraits(memory=True, beam_score=True),
    "mcts": StrategyTraits(),
    # greedy, then best-of-N and MCTS for the problems whose answer the scorer does not trust (search/adaptive.py)
    "adaptive": StrategyTraits(default_scorer="value"),
    # adaptive where the version has a calibrated value model, else beam (search/adaptive.py): a job's default
    "auto": StrategyTraits(memory=True, beam_score=True),
}


def traits_of(strategy: str) -> StrategyTraits:
    if not isinstance(strategy, str) or strategy not in TRAITS:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(TRAITS)}")
    return TRAITS[strategy]

