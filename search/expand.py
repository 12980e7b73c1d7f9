"""The expansion engine of the tree strategies: many frontier nodes grown by one step in one batched decode.

A node keeps the key/values of its own tokens; a parent's cache is rebuilt by concatenating the segments on
its path (`gather_prefix_kv`), so a shared prefix is computed once however many descendants it has. Every
forward and every cache goes through the Decoder (search/decoder.py).

Budget: every sampled token counts as one generated token and every batched forward as one forward pass,
both in total (`stats`) and per problem (`tokens_of`, `passes_of`), so strategies compare fairly.
"""

from __future__ import annotations

from collections import Counter

import torch

from search.decoder import DecodeStats, Decoder, sample_no_sync
from search.tree import Node

_DELIMITER_IDS: dict[tuple[int, str], frozenset[int]] = {}


def delimiter_ids(tokenizer, delimiter: str) -> frozenset[int]:
    """Ids of the tokens whose text contains `delimiter` (decoded once per tokenizer)."""
    key = (id(tokenizer), delimiter)
    if key not in _DELIMITER_IDS:
        if not delimiter:
            _DELIMITER_IDS[key] = frozenset()
        else:
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            _DELIMITER_IDS[key] = frozenset(i for i, t in enumerate(texts) if delimiter in t)
    return _DELIMITER_IDS[key]


class Expander:
    """Grows search trees for a batch of problems on one policy."""

    def __init__(self, decoder: Decoder, reuse_prefix: bool = True, delimiter: str = "\n", max_rows: int = 2048):
        self.decoder, self.tokenizer = decoder, decoder.tokenizer
        self.stats = DecodeStats()
        self.reuse_prefix = reuse_prefix
        self.delims = delimiter_ids(self.tokenizer, delimiter)
        self.eos, self.pad = decoder.eos, decoder.pad
        self.max_rows = max_rows
        self.tokens_of: Counter = Counter()  # id(root) -> generated tokens
        self.passes_of: Counter = Counter()  # id(root) -> forward passes it took part in

    def _count_pass(self, roots: list[Node]) -> None:
        self.stats.forward_passes += 1
        for r in {id(r): r for r in roots}:
            self.passes_of[r] += 1

    @torch.inference_mode()
    def roots(self, prompts: list[str]) -> list[Node]:
        """One root per prompt, prefilled in one batched forward (skipped when prefixes are recomputed)."""
        nodes = [Node(token_ids=list(ids)) for ids in self.decoder.encode(prompts)]
        if self.reuse_prefix:
            self._forward_pending(nodes, [len(n.token_ids) for n in nodes])
        return nodes

    def gather_prefix_kv(self, nodes: list[Node]):
        """The cache of every node's cached prefix, left-padded into one batch, with the matching full ids.

        Returns (cache, ids [B, T_cached + pending], mask, pending tokens per row)."""
        paths = [n.path() for n in nodes]
        segs = [[p.kv for p in path if p.kv is not None] for path in paths]
        cached = [sum(s.shape[3] for s in row) for row in segs]
        full = [[t for p in path for t in p.token_ids] for path in paths]
        pending = [f[c:] for f, c in zip(full, cached)]
        width = max(cached)
        L, _, H, _, D = next(s for row in segs for s in row).shape
        ref = segs[0][0]
        buf = torch.zeros((L, 2, len(nodes), H, width, D), dtype=ref.dtype, device=ref.device)
        for i, row in enumerate(segs):
            buf[:, :, i, :, width - cached[i] :] = torch.cat(row, dim=3)
        # pending tokens must line up at the right end: all rows carry the same number of them
        if len({len(p) for p in pending}) != 1:
            raise RuntimeError(f"rows have different pending token counts {sorted({len(p) for p in pending})}")
        ids, mask = self.decoder.left_pad([f[: c] + p for f, c, p in zip(full, cached, pending)])
        if ids.shape[1] != width + len(pending[0]):
            raise RuntimeError("cache and ids disagree on the padded width")
        return self.decoder.cache_from_kv(buf), ids, mask, pending

    def _forward_pending(self, nodes: list[Node], n_pending: list[int]):
        """Forward the not-yet-cached tokens of `nodes` (equal counts, or no cache at all: roots), append their
        key/values to each node's segment and store the next-token log-probs. Returns (cache, ids, mask, logp)."""
        roots = [n.path()[0] for n in nodes]
        if all(n.kv is None and n.parent is None for n in nodes):  # roots: plain left-padded prefill
            ids, mask = self.decoder.left_pad([n.token_ids for n in nodes])
            cache, logits = self.decoder.prefill(ids, mask)
        else:
            cache, ids, mask, pending = self.gather_prefix_kv(nodes)
            logits = self.decoder.step(ids, mask, cache, len(pending[0]))
        self._count_pass(roots)
        logp = torch.log_softmax(logits, dim=-1)
        for i, (node, n_new) in enumerate(zip(nodes, n_pending)):
            new = self.decoder.slice_kv(cache, torch.tensor([i]), n_new)[:, :, 0]
            node.kv = new if node.kv is None else torch.cat([node.kv, new], dim=3)
            node.next_logprobs = logp[i]
        return cache, ids, mask, logp

    def _prefill_from_scratch(self, parents: list[Node]):
        """The baseline without reuse: every parent's whole path recomputed in one left-padded prefill."""
        ids, mask = self.decoder.left_pad([p.full_ids() for p in parents])
        cache, logits = self.decoder.prefill(ids, mask)
        self._count_pass([p.path()[0] for p in parents])
        return cache, ids, mask, torch.log_softmax(logits, dim=-1)

    @torch.inference_mode()
    def expand(self, parents: list[Node], counts: list[int], temperature: float, max_step_tokens: int, max_new_tokens: int,
               generator=None, greedy_first: bool = False, to_the_end: bool = False) -> list[list[Node]]:
        """Grow `counts[i]` children of `parents[i]` by one step each (sampled, or greedy at temperature 0;
        with greedy_first the first child of every parent is its greedy step). With to_the_end a child runs to
        EOS or the token budget, past step delimiters (MCTS rollouts). Children are attached to their parents
        and returned per parent."""
        out: list[list[Node]] = []
        start = 0
        while start < len(parents):  # chunks of at most max_rows decoded rows
            stop, rows = start, 0
            while stop < len(parents) and (stop == start or rows + counts[stop] <= self.max_rows):
                rows += counts[stop]
                stop += 1
            out += self._expand_chunk(parents[start:stop], counts[start:stop], temperature, max_step_tokens, max_new_tokens,
                                      generator, greedy_first, to_the_end)
            start = stop
        return out

    def _expand_chunk(self, parents, counts, temperature, max_step_tokens, max_new_tokens, generator, greedy_first, to_the_end):
        if any(p.terminal for p in parents):
            raise RuntimeError("cannot expand a finished node")
        if self.reuse_prefix:
            need = [p for p in parents if p.next_logprobs is None]
            if need:
                res = self._forward_pending(need, [len(p.token_ids) - p.kv_len for p in need])
            if len(need) == len(parents):  # the cache just built is exactly the parents' cache
                cache, ids, mask, logp = res
            else:
                cache, ids, mask, _ = self.gather_prefix_kv(parents)
                if ids.shape[1] != cache.get_seq_length():
                    raise RuntimeError("a fully forwarded parent still has pending tokens")
                logp = torch.stack([p.next_logprobs for p in parents])
        else:
            cache, ids, mask, logp = self._prefill_from_scratch(parents)
        index = torch.repeat_interleave(torch.arange(len(parents)), torch.tensor(counts)).to(ids.device)
        self.decoder.select_rows(cache, index)
        ids, mask, logp = ids[index], mask[index], logp[index]
        owner = index.tolist()  # row -> parent index
        # the first row of every parent takes its greedy step; on the model's device, like the tokens it selects
        first = torch.tensor([greedy_first and (r == 0 or owner[r] != owner[r - 1]) for r in range(len(owner))], device=ids.device)
        delims = frozenset() if to_the_end else self.delims
        step_cap = max_new_tokens if to_the_end else max_step_tokens
        roots = [p.path()[0] for p in parents]
        budget = [max_new_tokens - p.depth_tokens() for p in parents]
        if to_the_end and temperature == 0 and self.decoder.draft_source is not None:
            return self._rollouts_with_drafts(parents, owner, roots, budget, cache, ids, mask, logp)
        new_ids: list[list[int]] = [[] for _ in owner]
        new_lps: list[list[float]] = [[] for _ in owner]
        new_ents: list[list[float]] = [[] for _ in owner]
        children: list[list[Node]] = [[] for _ in parents]
        alive_rows = list(range(len(owner)))  # batch row -> decoded row
        step = 0
        while True:
            token = sample_no_sync(logp / temperature, generator) if temperature > 0 else logp.argmax(-1)
            if greedy_first and temperature > 0:
                token = torch.where(first[torch.tensor(alive_rows, device=ids.device)], logp.argmax(-1), token)
            tok_lp = logp.gather(1, token[:, None])[:, 0]
            ent = -(logp.exp() * logp).sum(-1)
            self.stats.generated_tokens += len(alive_rows)
            stopped = []
            for b, (r, t, lp, e) in enumerate(zip(alive_rows, token.tolist(), tok_lp.tolist(), ent.tolist())):
                new_ids[r].append(t)
                new_lps[r].append(lp)
                new_ents[r].append(e)
                self.tokens_of[id(roots[owner[r]])] += 1
                n = step + 1
                if t == self.eos or t in delims or n >= step_cap or n >= budget[owner[r]]:
                    stopped.append(b)
            if stopped:
                keep_kv = self.reuse_prefix and step > 0
                seg = self.decoder.slice_kv(cache, torch.tensor(stopped), step) if keep_kv else None
                for j, b in enumerate(stopped):
                    r = alive_rows[b]
                    parent = parents[owner[r]]
                    finished = new_ids[r][-1] == self.eos
                    child = Node(new_ids[r], new_lps[r], new_ents[r], parent=parent, finished=finished)
                    child.truncated = not finished and len(new_ids[r]) >= budget[owner[r]]
                    if keep_kv and not child.terminal:
                        child.kv = seg[:, :, j]
                    parent.children.append(child)
                    children[owner[r]].append(child)
            alive = torch.ones(len(alive_rows), dtype=torch.bool)
            alive[stopped] = False
            if not bool(alive.any()):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if stopped:
                keep = alive.nonzero()[:, 0].to(ids.device)
                self.decoder.select_rows(cache, keep)
                ids, mask = ids[keep], mask[keep]
                alive_rows = [r for r, a in zip(alive_rows, alive.tolist()) if a]
            logits = self.decoder.step(ids, mask, cache)
            self._count_pass([roots[owner[r]] for r in alive_rows])
            logp = torch.log_softmax(logits, dim=-1)
            step += 1
        return children

    def _rollouts_with_drafts(self, parents, owner, roots, budget, cache, ids, mask, logp) -> list[list[Node]]:
        """Greedy rollouts to the end through verified draft trees (same tokens, fewer forwards). A rollout is
        terminal, so its key/values are not kept."""
        rows = self.decoder.greedy_with_drafts(ids, mask, cache, logp, [budget[o] for o in owner], self.stats)
        children: list[list[Node]] = [[] for _ in parents]
        for o, d in zip(owner, rows):
            parent = parents[o]
            child = Node(d.token_ids, d.logprobs, d.entropies, parent=parent, finished=d.finished)
            child.truncated = not d.finished and len(d.token_ids) >= budget[o]
            parent.children.append(child)
            children[o].append(child)
            self.tokens_of[id(roots[o])] += len(d.token_ids)
        for key in {id(r) for r in roots}:  # each root's rows took part in max(passes) - 1 verify steps (no prefill)
            self.passes_of[key] += max(d.forward_passes for o, d in zip(owner, rows) if id(roots[o]) == key) - 1
        return children
