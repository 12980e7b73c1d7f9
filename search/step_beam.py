"""Step-level beam search: each of the `beams` best partial completions grows `children` steps, its greedy step and
samples (a step ends at cfg.step_delimiter or after cfg.max_step_tokens tokens); the scorer ranks all new steps and the best
`beams` survive. A finished step leaves the beam and becomes a candidate. All problems advance together: one
expansion per depth for the whole batch, on shared-prefix key/values (search/expand.py).
"""

from __future__ import annotations

from tasks import Problem
from search.config import SearchConfig
from search.decoder import Decoder
from search.expand import Expander
from search.scorers import rank_by
from search.tree import Node, dedupe_children, mark_path, release_kv, to_candidate
from search.types import SearchPolicy, SearchResult


def step_beam(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    scorer = cfg.build_scorer(policy)
    decoder = Decoder(policy.model, policy.tokenizer)
    ex = Expander(decoder, delimiter=cfg.step_delimiter, max_rows=cfg.max_rows)
    generator = decoder.generator(cfg.seed)
    roots = ex.roots([p.prompt for p in problems])
    frontier: list[list[Node]] = [[r] for r in roots]
    done: list[list[Node]] = [[] for _ in problems]
    while any(frontier):
        parents = [n for f in frontier for n in f]
        kids = ex.expand(parents, [cfg.children] * len(parents), cfg.temperature, cfg.max_step_tokens, cfg.max_new_tokens, generator, greedy_first=True)
        by_parent = dict(zip(map(id, parents), kids))
        news = [[c for p in frontier[i] for c in dedupe_children(p, by_parent[id(p)])] for i in range(len(problems))]
        # every problem's new steps scored in one call (a value model scores them in batched forwards)
        growing = [i for i, new in enumerate(news) if new]
        tables = scorer.score([problems[i] for i in growing],
                              [[to_candidate(c, problems[i], policy.tokenizer) for c in news[i]] for i in growing])
        for i, scores in zip(growing, tables):
            for c, s in zip(news[i], scores):
                c.score = s
        for i in range(len(problems)):
            new = news[i]
            if not new:
                frontier[i] = []
                continue
            best = sorted(new, key=lambda c: c.score, reverse=True)[: cfg.beams]
            done[i] += [c for c in best if c.terminal]
            frontier[i] = [c for c in best if not c.terminal]
    results = []
    for i, (problem, root) in enumerate(zip(problems, roots)):
        leaves = done[i]
        cands = [to_candidate(n, problem, policy.tokenizer) for n in leaves]
        index = {id(c): j for j, c in enumerate(cands)}
        ranked = rank_by(scorer, problem, cands)
        mark_path(leaves[index[id(ranked[0])]])
        release_kv(root)
        results.append(
            SearchResult(problem, ranked, "step_beam", policy.version, ex.tokens_of[id(root)], ex.passes_of[id(root)],
                         tree=root if cfg.keep_tree else None)
        )
    return results
