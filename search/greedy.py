"""Greedy decoding: the most likely token at every step."""

from __future__ import annotations

from tasks import Problem
from search.sampling import sample_and_rank
from search.types import SearchConfig, SearchResult


def greedy(problems: list[Problem], cfg: SearchConfig, policy) -> list[SearchResult]:
    return sample_and_rank(problems, cfg, policy, n=1, temperature=0.0, strategy="greedy")
