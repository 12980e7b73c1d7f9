"""Token-level beam search with the semantics of transformers `generate(num_beams=B, do_sample=False)`.

`beam_update` is a port of generate's vectorised beam step (transformers 5.24 `_beam_search`: top 2B
continuations of the accumulated log-probs, the top B of which may finish on EOS or the length cap with
score sum_logprob / length**length_penalty, the best B unfinished ones run on, and the early-stopping
heuristic). tests/test_search_beam.py checks identical tokens and scores against `generate`.

One difference that cannot change a result: a problem whose hypotheses can no longer improve is dropped from
the batch (`_drop_done`), where generate keeps decoding it until every problem is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from search.config import SearchConfig, cache_factory
from search.decoder import DecodeStats, Decoder
from search.scorers import rank_by
from search.types import Candidate, SearchPolicy, SearchResult, confidence
from tasks import Problem, verify

NEG = -1.0e9  # generate's "impossible" score


@dataclass
class BeamState:
    """Beam search state for b problems x nb beams; token tensors hold generated tokens only."""

    running_seqs: torch.Tensor  # [b, nb, max_new]
    running_scores: torch.Tensor  # [b, nb] accumulated (processed) log-probs
    running_lps: torch.Tensor  # [b, nb, max_new] the model's own log-prob of each token
    running_ents: torch.Tensor  # [b, nb, max_new]
    seqs: torch.Tensor  # finished hypotheses, same layout
    scores: torch.Tensor  # [b, nb] length-penalised
    lps: torch.Tensor
    ents: torch.Tensor
    lengths: torch.Tensor  # [b, nb] generated length of each finished hypothesis
    is_finished: torch.Tensor  # [b, nb] bool
    unsatisfied: torch.Tensor  # [b, 1] bool: the early-stop heuristic says this problem may still improve

    @classmethod
    def start(cls, b: int, nb: int, max_new: int, fill: int) -> BeamState:
        running_scores = torch.zeros(b, nb)
        running_scores[:, 1:] = NEG  # only the first beam is live at step 0: no duplicate continuations
        seqs = torch.full((b, nb, max_new), fill, dtype=torch.long)
        zeros = torch.zeros(b, nb, max_new)
        return cls(
            seqs.clone(), running_scores, zeros.clone(), zeros.clone(), seqs, torch.full((b, nb), NEG), zeros.clone(),
            zeros.clone(), torch.zeros(b, nb, dtype=torch.long), torch.zeros(b, nb, dtype=torch.bool), torch.ones(b, 1, dtype=torch.bool),
        )

    def select(self, keep: torch.Tensor) -> BeamState:
        return BeamState(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_update(st: BeamState, processed: torch.Tensor, true_logp: torch.Tensor, cur: int, eos: int, max_new: int, length_penalty: float, early_stopping) -> tuple[BeamState, torch.Tensor]:
    """One beam step. processed/true_logp: [b, nb, V] log-probs (processed: after penalties, ranks beams;
    true: the model's own, recorded). Returns the new state and, per new running beam, its source beam [b, nb]."""
    b, nb, V = processed.shape
    acc = (processed + st.running_scores[:, :, None]).reshape(b, nb * V)
    topk_lp, topk_idx = torch.topk(acc, k=2 * nb)  # 2B: at most B continuations end on EOS, B keep running
    src, tok = topk_idx // V, topk_idx % V
    ent = -(true_logp.exp() * true_logp).sum(-1)  # [b, nb]
    k_seqs, k_lps, k_ents = _gather(st.running_seqs, src), _gather(st.running_lps, src), _gather(st.running_ents, src)
    k_seqs[:, :, cur] = tok
    k_lps[:, :, cur] = true_logp.reshape(b, nb * V).gather(1, topk_idx)
    k_ents[:, :, cur] = _gather(ent, src)
    hits = (tok == eos) | (cur + 1 >= max_new)
    # the best B that did not stop run on
    run_lp = topk_lp + hits.float() * NEG
    nxt = torch.topk(run_lp, k=nb)[1]
    running = (_gather(k_seqs, nxt), _gather(run_lp, nxt), _gather(k_lps, nxt), _gather(k_ents, nxt))
    source = _gather(src, nxt)
    # the top B that stopped may enter the finished set
    top_nb = torch.arange(2 * nb) < nb
    just_finished = hits & top_nb[None, :]
    fin = topk_lp / ((cur + 1) ** length_penalty)
    fin = fin + (torch.all(st.is_finished, dim=-1, keepdim=True) & (early_stopping is True)).float() * NEG
    fin = fin + (~st.unsatisfied).float() * NEG
    fin = fin + (~just_finished).float() * NEG
    merged_scores = torch.cat([st.scores, fin], dim=1)
    best = torch.topk(merged_scores, k=nb)[1]
    lengths = torch.cat([st.lengths, torch.full_like(tok, cur + 1)], dim=1)
    new = BeamState(
        *running,
        _gather(torch.cat([st.seqs, k_seqs], 1), best),
        _gather(merged_scores, best),
        _gather(torch.cat([st.lps, k_lps], 1), best),
        _gather(torch.cat([st.ents, k_ents], 1), best),
        _gather(lengths, best),
        _gather(torch.cat([st.is_finished, just_finished], 1), best),
        st.unsatisfied,
    )
    # early-stop heuristic, after the step (generated length is now cur + 1)
    length = max_new if (early_stopping == "never" and length_penalty > 0.0) else cur + 1
    best_possible = new.running_scores[:, :1] / (length**length_penalty)
    worst = torch.where(new.is_finished, torch.min(new.scores, dim=1, keepdim=True)[0], NEG)
    new.unsatisfied = st.unsatisfied & torch.any(best_possible > worst, dim=-1, keepdim=True)
    return new, source


def problem_done(st: BeamState, early_stopping) -> torch.Tensor:
    """[b] bool: nothing can change this problem's finished set any more."""
    return ~st.unsatisfied[:, 0] | (torch.all(st.is_finished, dim=-1) & (early_stopping is True))


def prefill_prompts(decoder: Decoder, prompts: list[str], width: int):
    """One left-padded prefill of the prompts, its cache repeated `width` times. Returns (cache, ids, mask, logp);
    the beam state and its log-probs live on the CPU (small), the cache and ids on the model's device."""
    ids, mask = decoder.left_pad(decoder.encode(prompts))
    cache, logits = decoder.prefill(ids, mask)
    decoder.repeat_rows(cache, width)
    logp = torch.log_softmax(logits, dim=-1).cpu().repeat_interleave(width, 0)
    return cache, ids.repeat_interleave(width, 0), mask.repeat_interleave(width, 0), logp


def step_logprobs(decoder: Decoder, prompt_ids, prompt_mask, running_seqs: torch.Tensor, cache) -> torch.Tensor:
    """Log-probs [rows, V] (CPU) of the next token after each running hypothesis [rows, cur] (cache reordered)."""
    seqs = running_seqs.to(prompt_ids.device)
    ids = torch.cat([prompt_ids, seqs], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(seqs)], dim=1)
    return torch.log_softmax(decoder.step(ids, mask, cache), dim=-1).cpu()


def candidates_from_state(problem: Problem, st: BeamState, i: int, tokenizer, eos: int) -> list[Candidate]:
    """Finished hypotheses of problem i, each with its beam score (unranked)."""
    out = []
    for j in range(st.scores.shape[1]):
        if not bool(st.is_finished[i, j]):
            continue
        n = int(st.lengths[i, j])
        ids = st.seqs[i, j, :n].tolist()
        lps, ents = st.lps[i, j, :n].tolist(), st.ents[i, j, :n].tolist()
        finished = ids[-1] == eos
        ids = ids[:-1] if finished else ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(Candidate(text, ids, finished=finished, verified=verify(problem, text), logprobs=lps,
                             beam_score=float(st.scores[i, j]), **confidence(lps, ents)))
    if not out:
        raise RuntimeError(f"beam search finished no hypothesis for problem {problem.id!r}")
    return out


@torch.inference_mode()
def _beam_chunk(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy,
                stats: DecodeStats) -> list[SearchResult]:
    decoder, tok = Decoder(policy.model, policy.tokenizer, cache_factory=cache_factory(cfg, policy)), policy.tokenizer
    nb, max_new, eos = cfg.beams, cfg.max_new_tokens, tok.eos_token_id
    scorer = cfg.build_scorer(policy)
    cache, prompt_ids, prompt_mask, logp = prefill_prompts(decoder, [p.prompt for p in problems], nb)
    stats.forward_passes += 1
    b = len(problems)
    st = BeamState.start(b, nb, max_new, tok.pad_token_id)
    active = torch.arange(b)  # problem indices still in the batch
    finals: dict[int, tuple[BeamState, int]] = {}
    tokens = [0] * b
    passes = [1] * b
    for cur in range(max_new):
        lp = logp.reshape(len(active), nb, -1)
        st, source = beam_update(st, lp, lp, cur, eos, max_new, cfg.length_penalty, cfg.early_stopping)
        stats.generated_tokens += len(active) * nb
        for a in active.tolist():
            tokens[a] += nb
        # reorder the cache rows to the surviving beams' sources, then drop finished problems
        flat = (torch.arange(len(active))[:, None] * nb + source).reshape(-1)
        decoder.select_rows(cache, flat)
        done = problem_done(st, cfg.early_stopping) | (cur + 1 >= max_new)
        for k in done.nonzero()[:, 0].tolist():
            finals[int(active[k])] = (st, k)
        if bool(done.all()):
            break
        if bool(done.any()):
            st, active, prompt_ids, prompt_mask = _drop_done(decoder, done, nb, st, active, cache, prompt_ids, prompt_mask)
        seqs = st.running_seqs[:, :, : cur + 1].reshape(len(active) * nb, cur + 1)
        logp = step_logprobs(decoder, prompt_ids, prompt_mask, seqs, cache)
        stats.forward_passes += 1
        for a in active.tolist():
            passes[a] += 1
    results = []
    for i, problem in enumerate(problems):
        fst, k = finals[i]
        cands = rank_by(scorer, problem, candidates_from_state(problem, fst, k, tok, eos))
        results.append(SearchResult(problem, cands, "beam", policy.version, tokens[i], passes[i]))
    return results


def _drop_done(decoder: Decoder, done, nb, st, active, cache, prompt_ids, prompt_mask):
    """Remove settled problems from the batch: their results can no longer change. Saves their rows when answer
    lengths differ; measured no gain on addition, whose answers all end at the same step."""
    keep = (~done).nonzero()[:, 0]
    rows = (keep[:, None] * nb + torch.arange(nb)).reshape(-1).to(prompt_ids.device)
    decoder.select_rows(cache, rows)
    return st.select(keep), active[keep], prompt_ids[rows], prompt_mask[rows]


def run_in_chunks(chunk_fn, problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    """Problems in chunks of at most cfg.max_rows decoded rows (beams rows each)."""
    stats = DecodeStats()
    per_chunk = max(1, cfg.max_rows // cfg.beams)
    results = []
    for start in range(0, len(problems), per_chunk):
        results += chunk_fn(problems[start : start + per_chunk], cfg, policy, stats)
    return results


def beam(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    return run_in_chunks(_beam_chunk, problems, cfg, policy)
