"""The Decoder: the only code in Arbor that creates KV caches and calls a model's forward.

Strategies ask it for steps; none of them touches the model or a cache class directly:

    prefill      left-padded prompts in one batched forward (in chunks past `prefill_chunk` tokens)
    step         new tokens per row through the model's own `prepare_inputs_for_generation`, as `generate`
                 does, so a model that derives positions from its input ids (the built-in coupled policy)
                 needs no special case
    tree_step    a draft tree per row in one forward: a 4D float mask (a node sees the prefix and its
                 ancestors), explicit position ids, logits at every node
    cache ops    repeat, select and reorder rows; crop; keep a tree step's accepted path; slice a segment out and
                 build a cache back from segments
    decode       the batched sampling loop (greedy at temperature 0) that drops finished rows

Every tensor it makes lives on the model's device, and random generators belong to that device.

Extension points for memory/: `cache_factory(model)` builds the cache (a context memory can replace the plain
KV cache), and `draft_source` proposes tokens that `tree_step` verifies (recycled tokens); see `DraftSource`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from search.kv import growing_cache


@dataclass
class Decoded:
    """One decoded continuation: token ids (EOS excluded), their log-probs under the model's own distribution
    (temperature 1) and the entropy of that distribution at each step."""

    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finished: bool  # reached EOS (False: ran out of max_new_tokens)
    forward_passes: int = 0  # forwards this row took part in, its prefill included


@dataclass
class DecodeStats:
    """The budget every strategy is compared by: generated tokens and batched forward passes."""

    generated_tokens: int = 0
    forward_passes: int = 0


class DraftSource(Protocol):
    """Proposes draft trees for greedy decoding and learns from every forward (memory/ implements it).

    `propose(last_tokens [B]) -> (tree_tokens [B, n], parents)`: node 0 is the root (the last accepted token,
    not yet in the cache); `parents[i] < i` is node i's parent (-1 for the root). `observe(input_ids [B, q],
    logits [B, q, V])` sees the inputs and logits of every forward the Decoder makes while it is attached.
    `accepted(best_nodes [B])` hears which node ended each row's accepted path after a verify step.
    `ready(decoder, batch, context) -> bool` says whether drafting pays for this batch size and context (the
    source may resize its tree first); when it does not, the Decoder decodes one token per forward.
    `finished(decoder, batch, context, seconds, tokens, drafted)` hears how fast a greedy decode really went,
    drafted or one token per forward after `ready` said no."""

    def ready(self, decoder: "Decoder", batch: int, context: int) -> bool: ...

    def finished(self, decoder: "Decoder", batch: int, context: int, seconds: float, tokens: int, drafted: bool) -> None: ...

    def propose(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]: ...

    def observe(self, input_ids: torch.Tensor, logits: torch.Tensor) -> None: ...

    def accepted(self, best_nodes: torch.Tensor) -> None: ...


def ancestor_matrix(parents: list[int], device=None) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
    return _ancestors(tuple(parents)).to(device)


@functools.lru_cache(maxsize=64)
def _ancestors(parents: tuple[int, ...]) -> torch.Tensor:
    # cached per tree shape: a draft loop asks for the same shape at every step
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if i == 0:
            if p != -1:
                raise ValueError(f"node 0 must be the root (parent -1), got parent {p}")
            continue
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}: parents must come before their children (breadth-first order)")
        anc[i] |= anc[p]
    return anc


def float_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """An additive mask (0 where allowed, the dtype's minimum elsewhere): under eager attention a bool 4D mask
    is silently wrong (measured error 7e-2 against 1.5e-7 for the float mask), under sdpa both are right."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def sequential_tree_inputs(mask: torch.Tensor, parents: list[int], dtype):
    """Tree inputs for ordinary positions: a node at (real prefix length + its depth), seeing the real prefix
    tokens and its ancestors. Returns (position_ids [B, n], 4D float mask [B, 1, n, T + n])."""
    anc = ancestor_matrix(parents, mask.device)  # [n, n]
    depth = anc.sum(-1) - 1  # [n]
    position_ids = mask.sum(-1, keepdim=True) + depth[None, :]
    B, n = mask.shape[0], len(parents)
    allowed = torch.cat([mask.bool()[:, None, :].expand(B, n, -1), anc[None].expand(B, -1, -1)], dim=-1)
    return position_ids, float_mask(allowed, dtype)[:, None]


def sample_no_sync(logprobs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logprobs) without a host sync: argmax(logp - log E), E ~ Exp(1) (exponential race)."""
    noise = torch.empty_like(logprobs).exponential_(generator=generator)
    return torch.argmax(logprobs - noise.log(), dim=-1)


class Decoder:
    def __init__(self, model, tokenizer, prefill_chunk: int = 4096,
                 cache_factory: Callable | None = None, draft_source: DraftSource | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk = prefill_chunk
        self.cache_factory = cache_factory
        self.draft_source = draft_source
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.forward_passes = 0  # every forward this decoder made

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ----- inputs and caches -----

    def generator(self, seed: int | None) -> torch.Generator | None:
        """A random generator on the model's device: a CPU generator cannot drive CUDA sampling."""
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]

    def left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists left-padded into (ids, mask) [B, T] on the model's device."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def new_cache(self):
        return self.cache_factory(self.model) if self.cache_factory is not None else growing_cache(self.model.config)

    def cache_from_kv(self, kv: torch.Tensor):
        """A cache holding kv [L, 2, B, H, T, D] (segments gathered by the tree expander)."""
        cache = self.new_cache()
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache

    @staticmethod
    def slice_kv(cache, rows: torch.Tensor, last: int) -> torch.Tensor:
        """The last `last` positions of some batch rows, all layers: [L, 2, R, H, last, D]."""
        rows = rows.to(cache.layers[0].keys.device)
        return torch.stack([torch.stack([layer.keys[rows, :, -last:], layer.values[rows, :, -last:]]) for layer in cache.layers])

    @staticmethod
    def repeat_rows(cache, times: int) -> None:
        cache.batch_repeat_interleave(times)

    @staticmethod
    def select_rows(cache, rows: torch.Tensor) -> None:
        """Keep (or reorder, or duplicate) batch rows: used to drop finished rows and to follow beam sources."""
        cache.batch_select_indices(rows.to(cache.layers[0].keys.device))

    @staticmethod
    def crop(cache, length: int) -> None:
        """Keep the first `length` positions (transformers 5.2x takes only a negative count of positions to drop)."""
        drop = cache.get_seq_length() - length
        if drop > 0:
            cache.crop(-drop)

    @staticmethod
    def compact_tail(cache, start: int, keep: torch.Tensor) -> None:
        """Keep positions [0, start) of every row as they are and, after them, the positions `start + keep`
        ([B, K], per row; after a tree step: the accepted path). Only the tail moves: gathering the whole cache
        copied the prefix at every verify step, and the next forward's cache update copies it once more anyway.
        Measured on the benchmark's code model, interleaved runs on the busy 2-core machine: decoding 1.2x faster
        with a small tree."""
        for layer in cache.layers:
            B, H, _, D = layer.keys.shape
            k = keep.to(layer.keys.device)[:, None, :, None].expand(B, H, keep.shape[1], D)
            for name in ("keys", "values"):
                full = getattr(layer, name)
                tail = full[:, :, start:].gather(2, k)  # a copy: source and destination overlap
                full[:, :, start: start + keep.shape[1]] = tail
                setattr(layer, name, full[:, :, : start + keep.shape[1]])

    # ----- forwards -----

    def _forward(self, **inputs) -> torch.Tensor:
        out = self.model(**inputs)
        self.forward_passes += 1
        return out.logits

    def step(self, ids: torch.Tensor, mask: torch.Tensor, cache, n_new: int = 1, all_logits: bool = False) -> torch.Tensor:
        """Forward the last `n_new` tokens of `ids` [B, T] (the rest is in `cache`). Returns float logits of the
        last position [B, V], or of all new positions [B, n_new, V] with all_logits."""
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = self.model.prepare_inputs_for_generation(
            ids, next_sequence_length=n_new, cache=cache, attention_mask=mask, position_ids=position_ids, use_cache=True,
        )
        logits = self._forward(**inputs, logits_to_keep=0 if all_logits else 1)
        if self.draft_source is not None:
            self.draft_source.observe(inputs["input_ids"][:, -logits.shape[1]:], logits)
        return logits.float() if all_logits else logits[:, -1, :].float()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        """A fresh cache holding `ids` [B, T]; returns (cache, last-position logits [B, V]). Prompts longer than
        `prefill_chunk` go through in chunks, so activation memory stays bounded by the chunk."""
        cache = self.new_cache()
        T = ids.shape[1]
        start = 0
        while True:
            stop = min(T, start + self.prefill_chunk)
            logits = self.step(ids[:, :stop], mask[:, :stop], cache, n_new=stop - start)
            if stop == T:
                return cache, logits
            start = stop

    def tree_inputs(self, ids: torch.Tensor, mask: torch.Tensor, tree: torch.Tensor, parents: list[int]):
        """Position ids [B, n] and a float 4D mask [B, 1, n, T + n] for a tree step after `ids` [B, T].

        A node sits at the position it would have on its own root-to-node path and sees the prefix's real tokens
        and its ancestors. A model that derives positions from its ids (the built-in coupled policy) supplies
        `prepare_tree_inputs` with the same contract, as it supplies `prepare_inputs_for_generation`."""
        own = getattr(self.model, "prepare_tree_inputs", None)
        if own is not None:
            return own(ids, mask, tree, parents)
        return sequential_tree_inputs(mask, parents, self.model.dtype)

    def tree_step(self, ids: torch.Tensor, mask: torch.Tensor, cache, tree: torch.Tensor, parents: list[int]) -> torch.Tensor:
        """One forward over a draft tree per row: `tree` [B, n] tokens after `ids` [B, T] (already in `cache`),
        `parents` the shared tree shape. Returns float logits at every node [B, n, V]; the nodes' key/values are
        appended to the cache (`compact_tail` keeps the accepted path afterwards)."""
        if cache.get_seq_length() != ids.shape[1]:
            raise ValueError(f"the cache holds {cache.get_seq_length()} positions but ids have {ids.shape[1]}: forward pending tokens first")
        if tree.shape[1] != len(parents):
            raise ValueError(f"tree has {tree.shape[1]} tokens per row but {len(parents)} parents")
        position_ids, float_mask = self.tree_inputs(ids, mask, tree, parents)
        logits = self._forward(input_ids=tree, attention_mask=float_mask, position_ids=position_ids, cache=cache,
                               use_cache=True, logits_to_keep=0)
        if self.draft_source is not None:
            self.draft_source.observe(tree, logits)
        return logits.float()

    # ----- the sampling loop -----

    @torch.inference_mode()
    def decode(self, prompts: list[str], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 64,
               max_rows: int = 2048, seed: int | None = None, stats: DecodeStats | None = None) -> list[list[Decoded]]:
        """Decode `n` continuations of every prompt; temperature 0 is greedy.

        Each prompt is prefilled once and its cache repeated n times, so a shared prompt is never recomputed.
        Finished rows leave the batch, so long stragglers do not drag dead rows along."""
        return self.decode_ids(self.encode(prompts), n, temperature, max_new_tokens, max_rows, seed, stats)

    @torch.inference_mode()
    def decode_ids(self, encoded: list[list[int]], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 64,
                   max_rows: int = 2048, seed: int | None = None, stats: DecodeStats | None = None) -> list[list[Decoded]]:
        """`decode` for prompts given as token ids."""
        stats = stats if stats is not None else DecodeStats()
        generator = self.generator(seed)
        results: list[list[Decoded]] = [[] for _ in encoded]
        prompts_per_chunk = max(1, max_rows // n)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
        for start in range(0, len(order), prompts_per_chunk):
            chunk = order[start: start + prompts_per_chunk]
            ids, mask = self.left_pad([encoded[i] for i in chunk])
            cache, logits = self.prefill(ids, mask)
            stats.forward_passes += 1
            if n > 1:
                self.repeat_rows(cache, n)
                ids, mask, logits = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
            greedy_source = self.draft_source if temperature == 0 else None
            if greedy_source is not None and greedy_source.ready(self, ids.shape[0], ids.shape[1]):
                rows_out = [_trim_at_eos(row, self.eos) for row in self.greedy_with_drafts(ids, mask, cache, logits, max_new_tokens, stats)]
            else:
                start_s = time.perf_counter()
                rows_out = self._sample_rows(ids, mask, cache, logits, temperature, max_new_tokens, generator, stats)
                if greedy_source is not None:  # the rows are Python lists now: the device has synchronised
                    greedy_source.finished(self, ids.shape[0], ids.shape[1], time.perf_counter() - start_s,
                                           sum(len(d.token_ids) + d.finished for d in rows_out), drafted=False)
            for r, d in enumerate(rows_out):
                results[chunk[r // n]].append(d)
        return results

    def _sample_rows(self, ids, mask, cache, logits, temperature, max_new_tokens, generator, stats) -> list[Decoded]:
        total, dev = ids.shape[0], self.device
        rows = torch.arange(total, device=dev)  # batch row -> output row
        tokens = torch.full((total, max_new_tokens), self.eos, dtype=torch.long, device=dev)
        token_logps = torch.zeros(total, max_new_tokens, device=dev)
        entropies = torch.zeros(total, max_new_tokens, device=dev)
        lengths = torch.full((total,), max_new_tokens, dtype=torch.long, device=dev)  # tokens before EOS
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            token = sample_no_sync(logp / temperature, generator) if temperature > 0 else logp.argmax(-1)
            tokens[rows, step] = token
            token_logps[rows, step] = logp.gather(1, token[:, None])[:, 0]
            entropies[rows, step] = -(logp.exp() * logp).sum(-1)
            stats.generated_tokens += len(rows)
            hit_eos = token == self.eos
            lengths[rows[hit_eos]] = step
            alive = ~hit_eos
            if step == max_new_tokens - 1 or not bool(alive.any()):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if not bool(alive.all()):
                keep = alive.nonzero()[:, 0]
                self.select_rows(cache, keep)
                ids, mask, rows = ids[keep], mask[keep], rows[keep]
            logits = self.step(ids, mask, cache)
            stats.forward_passes += 1
        tokens, token_logps, entropies = tokens.tolist(), token_logps.tolist(), entropies.tolist()
        # a row takes part in the prefill and in one forward per token after its first, up to EOS or the budget
        return [Decoded(tokens[r][:n], token_logps[r][:n], entropies[r][:n], finished=n < max_new_tokens,
                        forward_passes=min(n + 1, max_new_tokens))
                for r, n in enumerate(lengths.tolist())]

    def greedy_with_drafts(self, ids, mask, cache, logits, max_new_tokens: int | list[int], stats) -> list[Decoded]:
        """Greedy decoding that verifies a draft tree per row in each forward (speculative, lossless).

        `ids`/`mask` [B, T] are in `cache`; `logits` [B, V] are the next-token logits after them; the budget is
        one number or one per row. Returns each row's emitted tokens with EOS kept (and its log-prob), since
        the tree expander records EOS in its nodes; `decode` trims it.

        The root of every tree is the row's last accepted token, not yet cached. A draft node is accepted when
        its token is the argmax at its parent and its parent is accepted; each row keeps its deepest accepted
        node (the first on ties), emits the path's drafts plus the bonus token (the argmax at that node), and
        the cache keeps the prefix plus that path. Rows that accept fewer tokens than the longest row in the
        batch leave masked holes in the cache, which positions and attention skip."""
        dev, B, context, start = self.device, ids.shape[0], ids.shape[1], time.perf_counter()
        budget = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * B
        out_ids: list[list[int]] = [[] for _ in range(B)]
        out_lps: list[list[float]] = [[] for _ in range(B)]
        out_ents: list[list[float]] = [[] for _ in range(B)]
        finished = [False] * B
        logp = torch.log_softmax(logits, dim=-1)
        root = logp.argmax(-1)
        ent = _entropy(logp)
        for r, (t, lp, e) in enumerate(zip(root.tolist(), logp.gather(1, root[:, None])[:, 0].tolist(), ent.tolist())):
            out_ids[r].append(t), out_lps[r].append(lp), out_ents[r].append(e)
        stats.generated_tokens += B
        rows = list(range(B))  # batch row -> output row
        passes = [1] * B  # the prefill
        path = depth = anc = parent_index = None
        while True:
            alive = []
            for b, r in enumerate(rows):
                if out_ids[r][-1] == self.eos:
                    finished[r] = True
                elif len(out_ids[r]) < budget[r]:
                    alive.append(b)
            if len(alive) < len(rows):
                if not alive:
                    break
                keep = torch.tensor(alive, device=dev)
                self.select_rows(cache, keep)
                ids, mask, root = ids[keep], mask[keep], root[keep]
                rows = [rows[b] for b in alive]
            tree, parents = self.draft_source.propose(root)
            if path is None or path.shape[0] != len(parents):
                path, depth, anc = tree_paths(parents, dev)
                parent_index = torch.tensor([max(p, 0) for p in parents], device=dev)[None, :]
            T = ids.shape[1]
            logits = self.tree_step(ids, mask, cache, tree, parents)  # [b, n, V]
            stats.forward_passes += 1
            for r in rows:
                passes[r] += 1
            pred = logits.argmax(-1)  # [b, n]
            # a node is accepted when every node on its path matches the argmax at its parent: one gather and
            # one [b, n, n] reduction instead of a comparison per depth (a 16-deep chain made that 16 small ops)
            match = tree == pred.gather(1, parent_index.expand(tree.shape[0], -1))
            match[:, 0] = True
            ok = ~((~match)[:, None, :] & anc[None]).any(-1)
            best = torch.argmax(torch.where(ok, depth[None, :], -1), dim=-1)  # deepest accepted node, first on ties
            self.draft_source.accepted(best)
            chain = path[best]  # [b, D] accepted nodes root first, -1 past the path
            n_acc = (chain >= 0).sum(-1)  # root included
            bonus = pred.gather(1, best[:, None])[:, 0]
            # emitted tokens: the path's drafts (nodes 1..), each scored at its parent, then the bonus at the end node
            emit_nodes = torch.cat([chain[:, 1:], torch.full_like(chain[:, :1], -1)], dim=1)  # [b, D]
            src = chain.clamp(min=0)  # the node whose logits score each emitted token
            emit_tok = torch.where(emit_nodes >= 0, tree.gather(1, emit_nodes.clamp(min=0)), bonus[:, None])
            # log-softmax only at the path's nodes (D of n): the argmax above needs no normalising
            src_logp = torch.log_softmax(logits.gather(1, src[:, :, None].expand(-1, -1, logits.shape[-1])), dim=-1)
            emit_lp = src_logp.gather(2, emit_tok[:, :, None])[..., 0]
            emit_ent = _entropy(src_logp)
            D = chain.shape[1]
            counts = n_acc.tolist()
            tok_l, lp_l, ent_l = emit_tok.tolist(), emit_lp.tolist(), emit_ent.tolist()
            for b, r in enumerate(rows):
                for j in range(counts[b]):  # n_acc - 1 drafts and the bonus
                    if len(out_ids[r]) >= budget[r] or out_ids[r][-1] == self.eos:
                        break
                    out_ids[r].append(tok_l[b][j]), out_lps[r].append(lp_l[b][j]), out_ents[r].append(ent_l[b][j])
                    stats.generated_tokens += 1
            # the cache keeps the prefix and the accepted path (holes where a row accepted fewer than D)
            slots = torch.where(chain >= 0, chain, chain.max(dim=1, keepdim=True).values)
            self.compact_tail(cache, T, slots)
            ids = torch.cat([ids, tree.gather(1, slots)], dim=1)
            mask = torch.cat([mask, (chain >= 0).long()], dim=1)
            root = bonus
            trim = int((chain >= 0).any(0).sum())  # drop trailing all-hole columns
            if trim < D:
                self.crop(cache, T + trim)
                ids, mask = ids[:, : T + trim], mask[:, : T + trim]
        # the source compares the real speed with one-token steps (the .tolist() calls above synchronised)
        self.draft_source.finished(self, B, context, time.perf_counter() - start, sum(len(o) for o in out_ids), drafted=True)
        return [Decoded(out_ids[r], out_lps[r], out_ents[r], finished=finished[r], forward_passes=passes[r]) for r in range(B)]


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def _trim_at_eos(row: Decoded, eos: int) -> Decoded:
    """The sampling loop's convention: token ids, log-probs and entropies stop before EOS."""
    if eos not in row.token_ids:
        return row
    n = row.token_ids.index(eos)
    return Decoded(row.token_ids[:n], row.logprobs[:n], row.entropies[:n], finished=True, forward_passes=row.forward_passes)


def tree_paths(parents: list[int], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a tree shape: path [n, D] (each node's root-first chain of node indices, -1 padded), depth [n] and
    the ancestor matrix [n, n]. Cached per shape: draft loops ask for the same shape at every step."""
    path, depth, anc = _tree_paths(tuple(parents))
    return path.to(device), depth.to(device), anc.to(device)


@functools.lru_cache(maxsize=64)
def _tree_paths(parents: tuple[int, ...]):
    anc = _ancestors(parents)
    depth = anc.sum(-1) - 1
    D = int(depth.max()) + 1
    path = torch.full((len(parents), D), -1, dtype=torch.long)
    for i in range(len(parents)):
        chain = anc[i].nonzero()[:, 0]
        path[i, : len(chain)] = chain
    return path, depth, anc
