"""The search tree: a node is one step of a completion (a few tokens ending at a delimiter or a length cap).

A node holds its own token ids, their log-probs and entropies, its children, MCTS statistics (visits, value
sum, prior) and the key/values of its own tokens (`kv`), so that a child's cache is its ancestors' segments
concatenated: a shared prefix is computed once. The root's tokens are the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tasks import Problem, verify
from search.types import Candidate, confidence


@dataclass(eq=False)  # identity: nodes hold tensors, and two equal-looking steps are still two nodes
class Node:
    token_ids: list[int]  # this step's tokens (the prompt at the root); EOS included when finished
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    finished: bool = False  # ended with EOS
    truncated: bool = False  # hit max_new_tokens without EOS: terminal, not an answer
    # key/values of token_ids[:kv_len], all layers in one tensor: [L, 2, H, kv_len, D]
    kv: torch.Tensor | None = None
    next_logprobs: torch.Tensor | None = None  # [V] once the node's last token has been forwarded
    visits: int = 0
    value_sum: float = 0.0
    prior: float = 1.0
    score: float | None = None  # the scorer's value of the path ending here, when computed
    on_best_path: bool = False

    @property
    def terminal(self) -> bool:
        return self.finished or self.truncated

    @property
    def kv_len(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def path(self) -> list[Node]:
        """Root first."""
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def full_ids(self) -> list[int]:
        return [t for n in self.path() for t in n.token_ids]

    def completion(self) -> tuple[list[int], list[float], list[float]]:
        """Token ids (EOS excluded), log-probs and entropies from the root's children down to this node."""
        ids, lps, ents = [], [], []
        for n in self.path()[1:]:
            ids += n.token_ids
            lps += n.logprobs
            ents += n.entropies
        if self.finished:
            ids = ids[:-1]
        return ids, lps, ents

    def depth_tokens(self) -> int:
        return sum(len(n.token_ids) for n in self.path()[1:])


def puct(parent: Node, child: Node, c_puct: float, lo: float, hi: float) -> float:
    """PUCT (AlphaZero): normalised mean value + c * prior * sqrt(N_parent) / (1 + N_child).
    Values are min-max normalised over the tree (MuZero) because confidences are not in [0, 1]."""
    q = (child.value - lo) / (hi - lo) if child.visits and hi > lo else 0.0
    return q + c_puct * child.prior * math.sqrt(parent.visits) / (1 + child.visits)


def walk(root: Node):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def release_kv(root: Node) -> None:
    """Drop cached key/values and logits so that a kept tree costs no tensor memory."""
    for node in walk(root):
        node.kv = None
        node.next_logprobs = None


def mark_path(node: Node) -> None:
    for n in node.path():
        n.on_best_path = True


def to_candidate(node: Node, problem: Problem, tokenizer) -> Candidate:
    """The completion from the root to `node` (partial or finished) as a Candidate (score unset)."""
    ids, lps, ents = node.completion()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    verified = verify(problem, text) if node.finished else None
    return Candidate(text, ids, finished=node.finished, verified=verified, logprobs=lps, visits=node.visits, **confidence(lps, ents))


def dedupe_children(parent: Node, new: list[Node]) -> list[Node]:
    """Merge sampled children with identical tokens (keeping the first): a tree has one node per distinct step."""
    fresh = {id(c) for c in new}
    seen = {tuple(c.token_ids) for c in parent.children if id(c) not in fresh}
    kept = []
    for c in new:
        if tuple(c.token_ids) in seen:
            parent.children.remove(c)
            continue
        seen.add(tuple(c.token_ids))
        kept.append(c)
    return kept
