"""Diverse beam search (Vijayakumar et al. 2016): cfg.beams beams in cfg.groups groups. At every step the
groups move in turn; group g's log-probs are lowered by cfg.diversity_penalty times the number of times each
token was just chosen by groups 0..g-1 (Hamming diversity), then group g takes one generate-style beam step
(search/beam.py `beam_update`) with its own finished set. transformers 5 dropped this from its core
(`num_beam_groups` now needs Hub code), so there is no `generate` baseline; with groups=1 it is plain beam.

Returned: every group's finished hypotheses, ranked by their unpenalised score sum_logprob / len**length_penalty
(the penalty steers the search; it is not part of a completion's value).
"""

from __future__ import annotations

import torch

from search.beam import BeamState, beam_update, candidates_from_state, prefill_prompts, problem_done, run_in_chunks, step_logprobs
from search.config import SearchConfig, cache_factory
from search.decoder import DecodeStats, Decoder
from search.scorers import rank_by
from search.types import SearchPolicy, SearchResult
from tasks import Problem


@torch.inference_mode()
def _diverse_chunk(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy,
                   stats: DecodeStats) -> list[SearchResult]:
    decoder, tok = Decoder(policy.model, policy.tokenizer, cache_factory=cache_factory(cfg, policy)), policy.tokenizer
    nb, G, max_new, eos = cfg.beams, cfg.groups, cfg.max_new_tokens, tok.eos_token_id
    gb = nb // G  # beams per group
    scorer = cfg.build_scorer(policy)
    cache, prompt_ids, prompt_mask, logp = prefill_prompts(decoder, [p.prompt for p in problems], nb)
    stats.forward_passes += 1
    b = len(problems)
    groups = [BeamState.start(b, gb, max_new, tok.pad_token_id) for _ in range(G)]
    steps = 0
    for cur in range(max_new):
        lp = logp.reshape(b, G, gb, -1)
        used = torch.zeros(b, lp.shape[-1])  # [b, V] times each token was chosen at this step by earlier groups
        sources = []
        for g in range(G):
            processed = lp[:, g] - cfg.diversity_penalty * used[:, None, :]
            groups[g], src = beam_update(groups[g], processed, lp[:, g], cur, eos, max_new, cfg.length_penalty, cfg.early_stopping)
            used.scatter_add_(1, groups[g].running_seqs[:, :, cur], torch.ones(b, gb))
            sources.append(src + g * gb)
        steps += 1
        done = torch.stack([problem_done(st, cfg.early_stopping) for st in groups]).all(0)
        if bool(done.all()) or cur + 1 >= max_new:
            break
        flat = (torch.arange(b)[:, None] * nb + torch.cat(sources, dim=1)).reshape(-1)
        decoder.select_rows(cache, flat)
        seqs = torch.stack([st.running_seqs[:, :, : cur + 1] for st in groups], dim=1).reshape(b * nb, cur + 1)
        logp = step_logprobs(decoder, prompt_ids, prompt_mask, seqs, cache)
        stats.forward_passes += 1
    stats.generated_tokens += steps * b * nb
    results = []
    for i, problem in enumerate(problems):
        cands = [c for st in groups for c in candidates_from_state(problem, _true_scores(st, cfg.length_penalty), i, tok, eos)]
        cands = rank_by(scorer, problem, cands)
        results.append(SearchResult(problem, cands, "diverse_beam", policy.version, steps * nb, steps + 1))
    return results


def _true_scores(st: BeamState, length_penalty: float) -> BeamState:
    """The finished set rescored without the diversity penalty."""
    lengths = st.lengths.clamp(min=1)
    mask = torch.arange(st.lps.shape[-1])[None, None, :] < lengths[:, :, None]
    true = (st.lps * mask).sum(-1) / lengths.float() ** length_penalty
    return BeamState(st.running_seqs, st.running_scores, st.running_lps, st.running_ents, st.seqs, true, st.lps, st.ents,
                     st.lengths, st.is_finished, st.unsatisfied)


def diverse_beam(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    return run_in_chunks(_diverse_chunk, problems, cfg, policy)
