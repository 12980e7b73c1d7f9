"""The search seam: one config, one candidate type, one result type for every strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from agent.tasks import Problem

Strategy = Literal["greedy", "best_of_n"]


@dataclass
class SearchConfig:
    strategy: str = "greedy"
    # sampling
    n: int = 8  # candidates per problem for best_of_n
    temperature: float = 1.0
    max_new_tokens: int = 64
    # ranking: the verifier may rank candidates only when the run is allowed to use answers
    use_verifier: bool = False
    confidence: Literal["mean_logprob", "min_logprob"] = "mean_logprob"
    # batching
    max_rows: int = 2048  # sequences decoded at once
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be at least 1 (got n={self.n})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")


@dataclass
class Candidate:
    completion: str
    token_ids: list[int]
    mean_logprob: float
    min_logprob: float
    mean_entropy: float
    finished: bool
    verified: bool | None = None  # the checker's verdict; None when the problem has no answer
    score: float = 0.0


@dataclass
class SearchResult:
    problem: Problem
    candidates: list[Candidate]  # best first
    strategy: str
    policy_version: str
    generated_tokens: int = 0
    forward_passes: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]
