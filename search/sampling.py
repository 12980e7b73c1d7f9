"""Shared core of the sampling strategies: decode, score, verify, rank."""

from __future__ import annotations

from tasks import Problem, verify
from search.config import SearchConfig, cache_factory
from search.decoder import DecodeStats, Decoder, DraftSource
from search.scorers import rank_all
from search.types import Candidate, SearchPolicy, SearchResult, confidence


def sample_and_rank(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy, n: int, temperature: float,
                    strategy: str, draft_source: DraftSource | None = None) -> list[SearchResult]:
    stats = DecodeStats()
    decoded = Decoder(policy.model, policy.tokenizer, draft_source=draft_source,
                      cache_factory=cache_factory(cfg, policy)).decode(
        [p.prompt for p in problems],
        n=n,
        temperature=temperature,
        max_new_tokens=cfg.max_new_tokens,
        max_rows=cfg.max_rows,
        seed=cfg.seed,
        stats=stats,
    )
    scorer = cfg.build_scorer(policy)
    # one batched decode of every row's text instead of a tokenizer call per candidate
    texts = iter(policy.tokenizer.batch_decode([d.token_ids for outs in decoded for d in outs], skip_special_tokens=True))
    per_problem = []
    for problem, outs in zip(problems, decoded):
        candidates = []
        for d in outs:
            text = next(texts)
            candidates.append(
                Candidate(
                    completion=text,
                    token_ids=d.token_ids,
                    finished=d.finished,
                    verified=verify(problem, text),
                    **confidence(d.logprobs, d.entropies),
                )
            )
        per_problem.append(candidates)
    results = []
    # one call of the scorer for the whole batch (a value model scores it in batched forwards)
    for problem, outs, ranked in zip(problems, decoded, rank_all(scorer, problems, per_problem)):
        generated = sum(len(d.token_ids) + int(d.finished) for d in outs)
        steps = max(d.forward_passes for d in outs)  # a prompt's samples decode side by side
        results.append(SearchResult(problem, ranked, strategy, policy.version, generated, steps))
    return results
