"""MCTS with PUCT over steps (a step ends at cfg.step_delimiter or after cfg.max_step_tokens tokens).

One simulation per problem per round, all problems batched:
  select   from the root by PUCT: normalised mean value + c_puct * prior * sqrt(N_parent) / (1 + N_child);
  expand   the leaf into cfg.children steps: its greedy step and samples (identical ones merged); a child's prior is its step
           probability exp(sum of log-probs), normalised over its siblings;
  evaluate each new child: a finished answer by the scorer (the verifier counts when cfg.use_verifier), any
           other child by the scorer's value of one greedy rollout to the end (the rollout is a candidate too), or
           with cfg.leaf_value "prefix" by the scorer's value of the child's own partial completion (no rollout: a
           value model judges prefixes; a tree left without a finished answer gets one greedy rollout at the end);
  backup   each child's value to the child and every ancestor.
A terminal leaf reached by selection backs up its value again without cost. The answer: every finished
completion the search produced, ranked by the scorer (same rule as the other strategies).
"""

from __future__ import annotations

import math

from tasks import Problem
from search.config import SearchConfig
from search.decoder import Decoder
from search.expand import Expander
from search.scorers import rank_by
from search.tree import Node, dedupe_children, mark_path, puct, release_kv, to_candidate
from search.types import SearchPolicy, SearchResult


def _select(root: Node, c_puct: float, lo: float, hi: float) -> Node:
    node = root
    while node.children and not node.terminal:
        node = max(node.children, key=lambda c: puct(node, c, c_puct, lo, hi))
    return node


def _backup(node: Node, value: float) -> None:
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def mcts(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    scorer = cfg.build_scorer(policy)
    tok = policy.tokenizer
    # with cfg.recycling the greedy rollouts verify recycled-token drafts (same tokens, fewer forwards)
    decoder = Decoder(policy.model, tok, draft_source=policy.draft_source if cfg.recycling else None)
    ex = Expander(decoder, delimiter=cfg.step_delimiter, max_rows=cfg.max_rows)
    generator = decoder.generator(cfg.seed)
    roots = ex.roots([p.prompt for p in problems])
    bounds = [[math.inf, -math.inf] for _ in problems]  # min/max value seen per tree
    answers: list[list[Node]] = [[] for _ in problems]  # finished or truncated completions (tree leaves, rollouts)
    rollouts_on = cfg.leaf_value == "rollout"

    def values_of(owned: list[tuple[int, list[Node]]]) -> list[list[float]]:
        """The scorer's value of each node, every tree's nodes in one call (a value model batches its forwards)."""
        tables = scorer.score([problems[i] for i, _ in owned],
                              [[to_candidate(n, problems[i], tok) for n in nodes] for i, nodes in owned])
        out = []
        for (i, nodes), scores in zip(owned, tables):
            # a rollout that never finished, or a node cut at the length cap, is worth less than any answer
            values = [s - 1.0 if n.truncated or (rollouts_on and not n.finished) else s for n, s in zip(nodes, scores)]
            bounds[i] = [min([bounds[i][0], *values]), max([bounds[i][1], *values])]
            out.append(values)
        return out

    for _ in range(cfg.simulations):
        leaves, owners = [], []
        for i, root in enumerate(roots):
            leaf = _select(root, cfg.c_puct, *bounds[i])
            if leaf.terminal:
                _backup(leaf, leaf.score)
            else:
                leaves.append(leaf)
                owners.append(i)
        if not leaves:
            break
        kids = ex.expand(leaves, [cfg.children] * len(leaves), cfg.temperature, cfg.max_step_tokens, cfg.max_new_tokens, generator, greedy_first=True)
        new_by_owner = []
        for leaf, i, new in zip(leaves, owners, kids):
            new = dedupe_children(leaf, new)
            step_lp = [sum(c.logprobs) for c in new]
            top = max(step_lp)
            z = sum(math.exp(lp - top) for lp in step_lp)
            for c, lp in zip(new, step_lp):
                c.prior = math.exp(lp - top) / z
            new_by_owner.append((i, new))
        # one batched greedy rollout from every new non-terminal child; the rollout hangs off the tree
        open_kids = [c for _, new in new_by_owner for c in new if not c.terminal] if rollouts_on else []
        rollouts = {}
        if open_kids:
            outs = ex.expand(open_kids, [1] * len(open_kids), 0.0, cfg.max_step_tokens, cfg.max_new_tokens, to_the_end=True)
            for c, (r,) in zip(open_kids, outs):
                c.children.remove(r)  # a rollout is an estimate, not a tree node
                rollouts[id(c)] = r
        ends_by_owner = [(i, [rollouts.get(id(c), c) for c in new]) for i, new in new_by_owner]
        for (i, new), (_, ends), values in zip(new_by_owner, ends_by_owner, values_of(ends_by_owner)):
            for c, end, v in zip(new, ends, values):
                end.score = v
                c.score = v
                if end.terminal:  # with prefix values an open node is no answer yet
                    answers[i].append(end)
                _backup(c, v)
    if not rollouts_on:
        _finish_unanswered(ex, roots, answers, cfg)
    results = []
    for i, (problem, root) in enumerate(zip(problems, roots)):
        ends = answers[i]
        cands = [to_candidate(n, problem, tok) for n in ends]
        index = {id(c): j for j, c in enumerate(cands)}
        unique, seen = [], set()
        for cand in rank_by(scorer, problem, cands):
            if tuple(cand.token_ids) not in seen:
                seen.add(tuple(cand.token_ids))
                cand.visits = _tree_visits(ends[index[id(cand)]])
                unique.append((cand, index[id(cand)]))
        mark_path(ends[unique[0][1]])
        release_kv(root)
        results.append(
            SearchResult(problem, [c for c, _ in unique], "mcts", policy.version, ex.tokens_of[id(root)], ex.passes_of[id(root)],
                         tree=root if cfg.keep_tree else None)
        )
    return results


def _finish_unanswered(ex: Expander, roots: list[Node], answers: list[list[Node]], cfg: SearchConfig) -> None:
    """With prefix values a tree may end without a finished answer: one greedy rollout from the end of its most
    visited path (best value on ties) gives it one, batched over such trees."""
    ends, owners = [], []
    for i, root in enumerate(roots):
        if any(n.finished for n in answers[i]):
            continue
        node = root
        while node.children and not node.terminal:
            node = max(node.children, key=lambda c: (c.visits, c.value))
        if node.terminal:
            answers[i].append(node)
        else:
            ends.append(node)
            owners.append(i)
    if ends:
        outs = ex.expand(ends, [1] * len(ends), 0.0, cfg.max_step_tokens, cfg.max_new_tokens, to_the_end=True)
        for i, node, (r,) in zip(owners, ends, outs):
            node.children.remove(r)  # an answer, not a tree node
            answers[i].append(r)


def _tree_visits(node: Node) -> int:
    """Visits of the deepest tree node on the path (a rollout itself is never visited)."""
    while node.parent is not None and node not in node.parent.children:
        node = node.parent
    return node.visits
