"""Greedy decoding: the most likely token at every step."""

from __future__ import annotations

from tasks import Problem
from search.sampling import sample_and_rank
from search.config import SearchConfig
from search.types import SearchPolicy, SearchResult


def greedy(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    draft_source = None
    if cfg.recycling:
        draft_source = policy.draft_source
        if draft_source is None:
            raise ValueError("recycling needs a policy with a draft source: load it with Policy.load or the registry")
    return sample_and_rank(problems, cfg, policy, n=1, temperature=0.0, strategy="greedy", draft_source=draft_source)
