"""The search configuration: one for every strategy, checked in full when it is made (a job's JSON included)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from search.prompt_format import PromptFormat, chosen
from search.scorers import Scorer, load_scorer
from search.traits import TRAITS, traits_of
from search.types import SearchPolicy


def _listed(names: list[str], last: str) -> str:
    return ", ".join(names[:-1]) + f" {last} " + names[-1] if len(names) > 1 else "".join(names)


_WITH_MEMORY = _listed([s for s, t in TRAITS.items() if t.memory], "and")  # the strategies, for messages

@dataclass
class SearchConfig:
    strategy: str = field(default="greedy", metadata={"help": f"search strategy: {_listed(list(TRAITS), 'or')}"})
    # sampling
    n: int = field(default=8, metadata={"help": "candidates per problem (best_of_n)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (best_of_n, step_beam, mcts)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest completion, in tokens"})
    # ranking: the verifier may rank candidates only when the run is allowed to use answers
    use_verifier: bool = field(default=False, metadata={
        "help": "let the checker rank finished answers (problems with answers)"})
    confidence: Literal["mean_logprob", "min_logprob"] = field(default="mean_logprob", metadata={
        "help": "confidence that ranks candidates when no scorer is given: mean_logprob or min_logprob"})
    # batching
    max_rows: int = field(default=2048, metadata={"help": "sequences decoded at once"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    # tree search: beam, step_beam, diverse_beam, mcts
    beams: int = field(default=4, metadata={"help": "beam width (beam, step_beam, diverse_beam)"})
    length_penalty: float = field(default=1.0, metadata={
        "help": "beam score = sum logprob / length**length_penalty, as in generate"})
    early_stopping: bool | str = field(default=False, metadata={
        "help": "generate's beam early_stopping: False, True or 'never'"})
    groups: int = field(default=2, metadata={"help": "diverse_beam: groups of beams // groups beams each"})
    diversity_penalty: float = field(default=1.0, metadata={
        "help": "diverse_beam: Hamming penalty per earlier-group use of a token"})
    step_delimiter: str = field(default="\n", metadata={
        "help": "a tree step (step_beam, mcts) ends after a token containing this text ..."})
    max_step_tokens: int = field(default=4, metadata={"help": "... or after this many tokens"})
    children: int = field(default=4, metadata={"help": "sampled children per expanded node (step_beam, mcts)"})
    simulations: int = field(default=8, metadata={"help": "mcts: selection-expansion-backup rounds per problem"})
    c_puct: float = field(default=1.0, metadata={"help": "mcts: exploration weight of the prior"})
    leaf_value: Literal["rollout", "prefix"] = field(default="rollout", metadata={
        "help": "mcts: a new node's value is the scorer's on a greedy rollout to the end (rollout), or on the node's "
                "own partial completion with no rollout (prefix: for a scorer that values prefixes, such as value)"})
    accept_score: float | None = field(default=None, metadata={
        "help": "adaptive: a stage's best answer is kept when the scorer gives it at least this, else the next stage "
                "runs (unset: the threshold calibrated with the version's value model)"})
    repairs: int = field(default=6, metadata={
        "help": "adaptive: repairs of an untrusted greedy answer before sampling, each its next least confident token "
                "changed and the rest decoded greedily (a repair costs only the tokens after its change)"})
    give_up_score: float | None = field(default=None, metadata={
        "help": "adaptive: after a repair or sampling stage, a problem whose best answer scores under this stops "
                "there (more rarely finds what the first ones did not come near); unset: the calibrated one with a "
                "calibrated accept_score, else never"})
    scorer: str | None = field(default=None, metadata={
        "help": "how candidates are ranked, e.g. mean_logprob, min_logprob, neg_entropy, value, value+mean_logprob, "
                "verifier+min_logprob "
                "(default: from confidence and use_verifier)"})
    keep_tree: bool = field(default=False, metadata={
        "help": "attach the search tree to each result (for `arbor search --tree`)"})
    recycling: bool = field(default=False, metadata={
        "help": "greedy decoding verifies draft trees of recycled tokens (same output, fewer forwards; the tree is "
                "sized to the device, and drafting switches itself off at batch sizes where it measured no gain)"})
    memory: bool = field(default=False, metadata={
        "help": "attend through the context memory (initial tokens, blocks retrieved from FAISS, a local window) so "
                "prompts longer than the policy's trained window still work "
                f"({_WITH_MEMORY})"})
    prompt_format: str | None = field(default=None, metadata={
        "help": "how the prompt is put to the policy: raw, or chat (its tokenizer's chat template); unset: the policy "
                "version's own format"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "chat: a system message before each prompt (unset: the policy version's own)"})

    def __post_init__(self):
        traits = traits_of(self.strategy)
        # sizes are bounded so that no configuration (a job's JSON included) can ask for unbounded work or memory
        limits = {"n": 4096, "max_new_tokens": 32768, "max_rows": 65536, "beams": 256, "children": 256,
                  "simulations": 10000, "max_step_tokens": 1024, "groups": 256, "repairs": 1024}
        for name, high in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number (got {value!r})")
            if value > high:
                raise ValueError(f"{name} must be at most {high} (got {name}={value})")
        numbers = ("temperature", "length_penalty", "diversity_penalty", "c_puct")
        optional = tuple(name for name in ("accept_score", "give_up_score") if getattr(self, name) is not None)
        for name in numbers + optional:
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if not number or not math.isfinite(value) or abs(value) > 1e6:
                raise ValueError(f"{name} must be a finite number of magnitude at most 1e6 (got {value!r})")
        if self.prompt_format is not None or self.system_prompt is not None:
            PromptFormat(self.prompt_format or "chat", self.system_prompt)  # ValueError names what is wrong
        if self.temperature > 100:
            raise ValueError(f"temperature must be at most 100 (got {self.temperature})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a whole number from 0 to 2**63-1 (got {self.seed!r})")
        if not isinstance(self.step_delimiter, str) or len(self.step_delimiter) > 64:
            raise ValueError("step_delimiter must be a string of at most 64 characters")
        if self.leaf_value not in ("rollout", "prefix"):
            raise ValueError(f"leaf_value must be 'rollout' or 'prefix' (got {self.leaf_value!r})")
        if self.c_puct < 0:
            raise ValueError(f"c_puct must be >= 0 (got {self.c_puct})")
        if self.n < 1:
            raise ValueError(f"n must be at least 1 (got n={self.n})")
        if self.repairs < 0:
            raise ValueError(f"repairs must be at least 0 (got repairs={self.repairs})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if min(self.beams, self.children, self.simulations, self.max_step_tokens, self.max_rows) < 1:
            raise ValueError("beams, children, simulations, max_step_tokens and max_rows must be at least 1")
        if self.groups < 1:
            raise ValueError(f"groups must be at least 1 (got groups={self.groups})")
        if self.strategy == "diverse_beam" and self.beams % self.groups:
            raise ValueError(f"groups must divide beams (got beams={self.beams}, groups={self.groups})")
        for name in ("use_verifier", "keep_tree", "recycling", "memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (got {getattr(self, name)!r})")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise ValueError(f"early_stopping must be true, false or 'never' (got {self.early_stopping!r})")
        if not isinstance(self.confidence, str) or not (self.scorer is None or isinstance(self.scorer, str)):
            raise ValueError(f"confidence and scorer must be names (got confidence={self.confidence!r}, "
                             f"scorer={self.scorer!r})")
        if self.memory and not traits.memory:
            raise ValueError(f"memory works with {_WITH_MEMORY} (got strategy={self.strategy}): tree strategies "
                             "copy key/value segments between nodes, which a context memory does not hold")
        if self.memory and self.recycling:
            raise ValueError("memory and recycling cannot be combined: draft verification crops the cache, a context "
                             "memory cannot")
        self.build_scorer()  # an unknown scorer or confidence fails here, with the scorer's own message

    def prompt_format_for(self, policy: SearchPolicy) -> PromptFormat:
        """The format this search puts prompts in: its own choice, else the policy version's."""
        return chosen(self.prompt_format, self.system_prompt, policy.prompt_format)

    def build_scorer(self, policy: SearchPolicy | None = None) -> Scorer:
        """The scorer that ranks candidates: `scorer`, or by default the beam score for the strategies that rank
        like `generate` and the configured confidence for the others, after the verifier when the run may use
        answers. A search passes its `policy` (the value scorer reads its value model); a check of the
        configuration alone passes none."""
        traits = traits_of(self.strategy)
        base = traits.default_scorer or ("beam_score" if traits.beam_score else self.confidence)
        spec = self.scorer or (f"verifier+{base}" if self.use_verifier else base)
        return load_scorer(spec, self.use_verifier, self.length_penalty, policy)


def cache_factory(cfg: SearchConfig, policy: SearchPolicy):
    """The Decoder's cache factory for a search: the policy's context memory when `cfg.memory`, else None (the
    plain cache). Strategies import nothing from memory/ (a layer above search); the policy carries it."""
    return policy.memory_cache_factory() if cfg.memory else None
