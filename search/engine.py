"""Batched decoding with a KV cache: the expansion engine every strategy runs on.

Works for any transformers causal LM: each step goes through the model's own
`prepare_inputs_for_generation` (as `generate` does), so a model that derives positions from its input
ids (the built-in coupled policy) needs no special case here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class Decoded:
    """One decoded continuation: token ids (EOS excluded), their log-probs under the model's own distribution
    (temperature 1) and the entropy of that distribution at each step."""

    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finished: bool  # reached EOS (False: ran out of max_new_tokens)


@dataclass
class DecodeStats:
    generated_tokens: int = 0
    forward_passes: int = 0
    rows: int = 0
    extra: dict = field(default_factory=dict)


def _step(model, full_ids, attention_mask, cache, n_new):
    """One forward over the last `n_new` tokens of `full_ids`, through the model's own input preparation."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = model.prepare_inputs_for_generation(
        full_ids,
        next_sequence_length=n_new,
        cache=cache,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
    )
    out = model(**inputs, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def _sample_no_sync(logprobs_t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # exponential-race sampling: argmax(logp - log(E)) with E ~ Exp(1) samples from softmax(logp)
    noise = torch.empty_like(logprobs_t).exponential_(generator=generator)
    return torch.argmax(logprobs_t - noise.log(), dim=-1)


@torch.inference_mode()
def decode(
    model,
    tokenizer,
    prompts: list[str],
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 64,
    max_rows: int = 2048,
    seed: int | None = None,
    stats: DecodeStats | None = None,
) -> list[list[Decoded]]:
    """Decode `n` continuations of every prompt; temperature 0 is greedy.

    Each prompt is prefilled once and its cache repeated n times, so a shared prompt is never recomputed.
    Finished rows are dropped from the batch (`_compact`) so that long stragglers do not drag dead rows along.
    """
    stats = stats if stats is not None else DecodeStats()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = tokenizer.eos_token_id
    results: list[list[Decoded]] = [[] for _ in prompts]
    prompts_per_chunk = max(1, max_rows // n)
    # sort by length so chunks carry little padding
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), prompts_per_chunk):
        chunk = order[start : start + prompts_per_chunk]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = enc.input_ids.to(model.device)
        mask = enc.attention_mask.to(model.device)
        cache = DynamicCache(config=model.config)
        logits = _step(model, ids, mask, cache, ids.shape[1])
        stats.forward_passes += 1
        if n > 1:
            cache.batch_repeat_interleave(n)
            ids, mask, logits = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
        total = ids.shape[0]
        rows = torch.arange(total, device=ids.device)  # batch row -> chunk row (prompt index * n + sample)
        tokens = torch.full((total, max_new_tokens), eos, dtype=torch.long)
        token_logps = torch.zeros(total, max_new_tokens)
        entropies = torch.zeros(total, max_new_tokens)
        lengths = torch.full((total,), max_new_tokens, dtype=torch.long)  # tokens before EOS
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            token = _sample_no_sync(logp / temperature, generator) if temperature > 0 else logp.argmax(-1)
            tokens[rows, step] = token
            token_logps[rows, step] = logp.gather(1, token[:, None])[:, 0]
            entropies[rows, step] = -(logp.exp() * logp).sum(-1)
            stats.generated_tokens += len(rows)
            hit_eos = token == eos
            lengths[rows[hit_eos]] = step
            alive = ~hit_eos
            if not bool(alive.any()) or step == max_new_tokens - 1:
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if not bool(alive.all()):
                ids, mask, rows, cache = _compact(alive, ids, mask, rows, cache)
            logits = _step(model, ids, mask, cache, 1)
            stats.forward_passes += 1
        for r, length in enumerate(lengths.tolist()):
            results[chunk[r // n]].append(
                Decoded(
                    tokens[r, :length].tolist(),
                    token_logps[r, :length].tolist(),
                    entropies[r, :length].tolist(),
                    finished=length < max_new_tokens,
                )
            )
        stats.rows += total
    return results


def _compact(alive, ids, mask, rows, cache):
    """Drop finished rows from the batch and its cache (one index_select per layer)."""
    keep = alive.nonzero()[:, 0]
    cache.batch_select_indices(keep)
    return ids[keep], mask[keep], rows[keep], cache
