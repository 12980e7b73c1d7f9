"""The search seam's types: what search needs of a policy, one candidate type and one result type for every
strategy (the configuration: search/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from tasks import Problem

if TYPE_CHECKING:  # annotations only: the types load without torch (search/__init__.py)
    import torch
    from transformers import PreTrainedTokenizerBase

    from search.decoder import DraftSource
    from search.prompt_format import PromptFormat


@runtime_checkable
class SearchPolicy(Protocol):
    """What search and the memory it draws on use of a policy (agent.policy.Policy is one): read-only."""

    @property
    def model(self) -> torch.nn.Module:
        """A transformers causal LM (the Decoder calls its forward and prepare_inputs_for_generation)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Its tokenizer, with pad and EOS tokens."""

    @property
    def version(self) -> str:
        """The version each SearchResult records."""

    @property
    def prompt_format(self) -> PromptFormat:
        """How the version puts a prompt to its model (search/prompt_format.py): raw or its chat template."""

    @property
    def draft_source(self) -> DraftSource | None:
        """Recycled-token drafts for greedy decoding (SearchConfig.recycling); None: no recycling."""

    def memory_cache_factory(self) -> Callable:
        """The Decoder's cache factory for the context memory (SearchConfig.memory); ValueError when this model
        cannot run it."""


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
    beam_score: float | None = None  # beam strategies: sum logprob / length**length_penalty, as generate ranks


def confidence(logprobs: list[float], entropies: list[float]) -> dict[str, float]:
    """A Candidate's confidence summaries from the policy's own token log-probs and entropies: length-normalised
    log-prob, minimum log-prob and mean entropy (ranking by them: search/scorers.py)."""
    if not logprobs:
        return {"mean_logprob": 0.0, "min_logprob": 0.0, "mean_entropy": 0.0}
    return {
        "mean_logprob": sum(logprobs) / len(logprobs),
        "min_logprob": min(logprobs),
        "mean_entropy": sum(entropies) / len(entropies),
    }


@dataclass
class SearchResult:
    problem: Problem
    candidates: list[Candidate]  # best first
    strategy: str
    policy_version: str
    generated_tokens: int = 0
    forward_passes: int = 0
    tree: object = None  # the root search.tree.Node when cfg.keep_tree (key/values released)
    stages: list[dict] = field(default_factory=list)  # adaptive: what each stage spent and why the next one ran

    @property
    def best(self) -> Candidate:
        return self.candidates[0]
