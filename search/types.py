"""The search seam: one config, one candidate type, one result type for every strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tasks import Problem

Strategy = Literal["greedy", "best_of_n", "beam", "step_beam", "diverse_beam", "mcts"]


@dataclass
class SearchConfig:
    strategy: Strategy = "greedy"
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
    # tree search (issue 3): beam, step_beam, diverse_beam, mcts
    beams: int = 4  # beam width (token beam, step beam, diverse beam)
    length_penalty: float = 1.0  # beam score = sum logprob / length**length_penalty, as in generate
    early_stopping: bool | str = False  # generate's beam early_stopping: False, True or "never"
    groups: int = 2  # diverse beam: groups of beams // groups beams each
    diversity_penalty: float = 1.0  # diverse beam: Hamming penalty per earlier-group use of a token
    step_delimiter: str = "\n"  # a tree step ends after a token containing this text ...
    max_step_tokens: int = 4  # ... or after this many tokens
    children: int = 4  # step_beam / mcts: sampled children per expanded node
    simulations: int = 8  # mcts: selection-expansion-backup rounds per problem
    c_puct: float = 1.0  # mcts: exploration weight of the prior
    scorer: str | None = None  # e.g. "mean_logprob", "verifier+min_logprob"; None: from confidence/use_verifier
    reuse_prefix: bool = True  # False recomputes every node's prefix (the benchmark's baseline)
    keep_tree: bool = False  # attach the search tree to each result (for `arbor search --tree`)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be at least 1 (got n={self.n})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.beams < 1 or self.children < 1 or self.simulations < 1 or self.max_step_tokens < 1:
            raise ValueError("beams, children, simulations and max_step_tokens must be at least 1")
        if self.strategy == "diverse_beam" and self.beams % self.groups:
            raise ValueError(f"groups must divide beams (got beams={self.beams}, groups={self.groups})")


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
    logprobs: list[float] = field(default_factory=list)  # per token, for scorers that need more than summaries
    visits: int = 0  # mcts: visits of the node the candidate ends in


@dataclass
class SearchResult:
    problem: Problem
    candidates: list[Candidate]  # best first
    strategy: str
    policy_version: str
    generated_tokens: int = 0
    forward_passes: int = 0
    stats: dict = field(default_factory=dict)
    tree: object = None  # the root search.tree.Node when cfg.keep_tree (key/values released)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]
