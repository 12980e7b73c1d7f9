"""Context memory (InfLLM: Xiao et al., NeurIPS 2024, arXiv 2402.04617): long inputs for a model trained on a
short window, with no training.

Past keys and values are cut into blocks of `block_size` tokens as they leave a local window. Each block is
summarised by a representative vector: per query head, the mean of the pre-RoPE keys of the `repr_topk` tokens
that received the most attention while they were in the local window (heads concatenated). The
representatives are indexed in FAISS (memory/blocks.py). Every span of `exec_chunk` queries (and the last
query of a forward on its own) attends, in one softmax, to

    the local window    the last `n_local` tokens, at their true relative positions
    the initial tokens  the first `n_init` tokens to leave the window (attention sinks)
    retrieved blocks    the `topk` blocks whose representatives best match the span's mean query
    the remainder       tokens that left the window but do not fill a block yet

Positions follow InfLLM: keys are kept without RoPE; in the local stage query and keys are rotated at their
positions relative to the window's start; every key outside the window (initial, retrieved, remainder) is
unrotated and the queries are rotated at the single position `n_local`, so every distant token sits at
distance `n_local`. With n_init + topk * block_size + n_local at most the trained window, no query ever sees a
relative position the model was not trained on. With `topk = 0` evicted tokens are dropped: a sliding window
with initial tokens (StreamingLLM-style), the benchmark's baseline.

Seams on transformers 5.24 (Llama, Qwen2, Mistral attention): the cache's `update` receives the attention
call's keyword dict (`cache.update(k, v, layer_idx, kwargs=kwargs)`, the same dict then given to the attention
function), so the layer puts itself in that dict and the registered attention function `ATTENTION` finds it
there, with the call's `position_ids`. Without a context memory in the call the function is plain sdpa, so a
model switched to it behaves as before for every other cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from memory.blocks import BlockStore

ATTENTION = "arbor_context_memory"
SUPPORTED = ("llama", "qwen2", "mistral", "arbor")


@dataclass
class ContextMemoryConfig:
    """Sizes of the context memory, in tokens; `for_window` derives them from the model's trained window."""

    n_init: int = field(default=8, metadata={"help": "initial tokens kept for good (attention sinks)"})
    n_local: int = field(default=128, metadata={"help": "local window: the most recent tokens, at true positions"})
    block_size: int = field(default=16, metadata={"help": "tokens per memory block"})
    topk: int = field(default=7, metadata={"help": "blocks retrieved per query span (0: a sliding window)"})
    repr_topk: int = field(default=4, metadata={"help": "most-attended tokens averaged into a block's representative"})
    exec_chunk: int = field(default=32, metadata={"help": "queries per retrieval when a forward holds many"})
    max_cached: int = field(default=32, metadata={"help": "blocks per layer and sequence kept on the device"})

    def __post_init__(self):
        for name in ("n_init", "n_local", "block_size", "repr_topk", "exec_chunk", "max_cached"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0 (got {self.topk})")
        if self.repr_topk > self.block_size:
            raise ValueError(f"repr_topk must be at most block_size (got {self.repr_topk} > {self.block_size})")
        if self.max_cached < self.topk:
            raise ValueError(f"max_cached must hold the retrieved blocks (got max_cached={self.max_cached} < topk={self.topk})")

    @property
    def attended(self) -> int:
        """Keys one query attends to at most: initial + retrieved + local."""
        return self.n_init + self.topk * self.block_size + self.n_local

    @classmethod
    def for_window(cls, window: int) -> "ContextMemoryConfig":
        """Half the window local, blocks of window/16 tokens (16-128), as many retrieved blocks as fit the rest:
        InfLLM's own settings have the same shape (4K local + 16 blocks of 128 + 128 initial for 8K-32K models)."""
        if window < 64:
            raise ValueError(f"the context memory needs a trained window of at least 64 tokens (got {window})")
        block = max(16, min(128, window // 16))
        n_init = max(4, min(128, window // 32))
        n_local = min(4096, window // 2)
        topk = min(16, (window - n_init - n_local) // block)
        return cls(n_init=n_init, n_local=n_local, block_size=block, topk=topk,
                   exec_chunk=min(512, 2 * block), max_cached=max(1, 2 * topk))


def trained_window(model) -> int:
    return int(model.config.max_position_embeddings)


def check_model(model) -> None:
    """Raise ValueError (one line) unless the context memory can run this model."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"the context memory needs a Llama-architecture model (llama, qwen2, mistral or the built-in "
                         f"policy); this one is {cfg.model_type!r}")
    if getattr(cfg, "position_scheme", "sequential") != "sequential":
        raise ValueError("the context memory needs sequential positions; this built-in policy uses position coupling "
                         "(it derives positions from digits, so long inputs do not move its positions)")
    rope = model.model.rotary_emb
    if getattr(rope, "attention_scaling", 1.0) != 1.0:
        raise ValueError(f"the context memory re-rotates keys with plain RoPE; this model's RoPE scales attention "
                         f"({rope.rope_type})")


def supports(model) -> bool:
    try:
        check_model(model)
    except ValueError:
        return False
    return True


def exceeds_window(model, n_tokens: int) -> bool:
    """Whether a sequence of n_tokens runs past the model's trained window and the context memory can take it."""
    return n_tokens > trained_window(model) and supports(model)


class Rotary:
    """RoPE at arbitrary (also negative) positions, with the model's own frequencies: x [..., n, D], pos [n]."""

    def __init__(self, model):
        self.inv_freq = model.model.rotary_emb.inv_freq  # [D / 2]

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        freqs = pos.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq.float()[None, :]  # [n, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


@dataclass
class RowState:
    """One sequence's memory in one layer. Tensors are replaced, never written in place, so copies share them."""

    store: BlockStore
    count: int = 0  # real tokens seen
    recent_k: torch.Tensor | None = None  # [H_kv, R, D] pre-RoPE, tokens count-R .. count-1
    recent_v: torch.Tensor | None = None
    recent_score: torch.Tensor | None = None  # [H_q, R] float32: attention received while in the window
    init_k: torch.Tensor | None = None  # [H_kv, <= n_init, D] pre-RoPE
    init_v: torch.Tensor | None = None
    rem_k: torch.Tensor | None = None  # [H_kv, < block_size, D]: left the window, no block yet
    rem_v: torch.Tensor | None = None
    rem_score: torch.Tensor | None = None

    def copy(self) -> "RowState":
        return RowState(self.store.copy(), self.count, self.recent_k, self.recent_v, self.recent_score,
                        self.init_k, self.init_v, self.rem_k, self.rem_v, self.rem_score)


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=dim)


class MemoryLayer(CacheLayerMixin):
    """One model layer's context memory: a RowState per batch row."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, memory: "ContextMemory"):
        super().__init__()
        self.memory = memory
        self.rows: list[RowState] = []
        self.seen = 0  # input columns seen, padding included (what the Decoder counts)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, kwargs=None, **_):
        if kwargs is None:
            raise RuntimeError("this model's attention does not hand its call arguments to the cache: the context "
                               "memory runs Llama, Qwen2 and Mistral attention (transformers 5.24)")
        self.pending = (key_states, value_states)
        kwargs["context_memory_layer"] = self  # the same dict is splatted into the attention function next
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # only the new columns: the mask is read for padding among the new tokens, never for past keys
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("the context memory cannot drop positions (tree steps and draft verification need a plain cache)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rows = [r.copy() for r in self.rows for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows = [self.rows[i].copy() for i in indices.tolist()]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        self.rows, self.seen = [], 0

    def attend(self, query: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [B, H_q, c, D] (rotated at position_ids [B, c]), valid [B, c] bool (False: padding). Returns the
        attention output [B, c, H_q, D]; the pending keys/values join the memory."""
        k_new, v_new = self.pending
        self.pending = None
        B, Hq, c, D = query.shape
        if not self.rows:
            self.rows = [RowState(BlockStore(Hq * D, query.device, self.memory.cfg.max_cached)) for _ in range(B)]
            # empty, a device marker only: the Decoder moves row indices to cache.layers[0].keys.device
            self.keys = self.values = torch.empty(0, device=query.device)
        if len(self.rows) != B:
            raise RuntimeError(f"the context memory holds {len(self.rows)} rows but the forward has {B}")
        out = torch.zeros(B, Hq, c, D, dtype=query.dtype, device=query.device)
        for b in range(B):
            idx = valid[b].nonzero()[:, 0]
            if len(idx):
                out[b, :, idx] = self.memory.attend_row(self.rows[b], query[b][:, idx], k_new[b][:, idx],
                                                        v_new[b][:, idx], position_ids[b, idx], scaling)
        self.seen += c
        return out.transpose(1, 2)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of keys/values on the device: window, initial, remainder and cached blocks; bytes of all blocks)."""
        resident = stored = 0
        for r in self.rows:
            for t in (r.recent_k, r.recent_v, r.init_k, r.init_v, r.rem_k, r.rem_v):
                resident += 0 if t is None else t.nbytes
            cached, blocks = r.store.nbytes()
            resident, stored = resident + cached, stored + blocks
        return resident, stored


class ContextMemory(Cache):
    """A transformers Cache whose layers are context memories; `Decoder(cache_factory=...)` builds one per prefill.

    Supported cache operations: append (prefill in chunks, one-token steps), repeat and select rows (samples,
    beams). Not supported: crop and position compaction (tree steps), which raise."""

    def __init__(self, model, cfg: ContextMemoryConfig | None = None):
        check_model(model)
        self.cfg = cfg or ContextMemoryConfig.for_window(trained_window(model))
        self.rotary = Rotary(model)
        super().__init__(layers=[MemoryLayer(self) for _ in range(model.config.num_hidden_layers)])
        if model.config._attn_implementation != ATTENTION:
            model.set_attn_implementation(ATTENTION)  # plain sdpa for every other cache (see `attention`)

    def nbytes(self) -> tuple[int, int]:
        pairs = [layer.nbytes() for layer in self.layers]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def block_count(self) -> int:
        return sum(len(r.store) for layer in self.layers for r in layer.rows)

    # ----- one sequence in one layer -----

    def attend_row(self, row: RowState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                   scaling: float) -> torch.Tensor:
        """q [H_q, n, D] and k [H_kv, n, D] rotated at pos [n]; v [H_kv, n, D]. Returns [H_q, n, D]."""
        q_raw, k_raw = self.rotary(q, -pos), self.rotary(k, -pos)  # back to pre-RoPE
        n, step, outs, a = q.shape[1], self.cfg.exec_chunk, [], 0
        while a < n:
            e = n - 1 if a < n - 1 and a + step >= n else min(n, a + step)  # the last query retrieves on its own
            Hq = q.shape[0]
            row.recent_k, row.recent_v = _cat(row.recent_k, k_raw[:, a:e], 1), _cat(row.recent_v, v[:, a:e], 1)
            row.recent_score = _cat(row.recent_score, torch.zeros(Hq, e - a, device=q.device), 1)
            row.count += e - a
            outs.append(self._attend_span(row, q_raw[:, a:e], scaling))
            self._evict(row)
            a = e
        return torch.cat(outs, dim=1)

    def _attend_span(self, row: RowState, q_raw: torch.Tensor, scaling: float) -> torch.Tensor:
        cfg, rot = self.cfg, self.rotary
        Hq, m, _ = q_raw.shape
        groups = Hq // row.recent_k.shape[0]
        R = row.recent_k.shape[1]
        dev = q_raw.device
        # local stage: positions relative to the window's start (only differences matter under RoPE)
        t_q = torch.arange(R - m, R, device=dev)  # the span's queries are the last m recent tokens
        t_k = torch.arange(R, device=dev)
        dist = t_q[:, None] - t_k[None, :]  # [m, R]
        local_ok = (dist >= 0) & (dist < cfg.n_local)
        k_loc = rot(row.recent_k, t_k).repeat_interleave(groups, 0)  # [H_q, R, D]
        logits = [(rot(q_raw, t_q) @ k_loc.transpose(1, 2) * scaling).masked_fill(~local_ok, float("-inf"))]
        values = [row.recent_v.repeat_interleave(groups, 0)]
        # global stage: every key outside the window unrotated, the queries rotated at the one position n_local
        g_k, g_v, g_ok = [], [], []
        if row.init_k is not None:
            g_k.append(row.init_k), g_v.append(row.init_v), g_ok.append(torch.ones(m, row.init_k.shape[1], dtype=torch.bool, device=dev))
        q_glob = rot(q_raw, torch.full((m,), cfg.n_local, device=dev))
        if cfg.topk > 0:
            ids = row.store.search(q_glob.mean(1).reshape(-1), cfg.topk)
            if ids:
                k_b, v_b = row.store.fetch(ids)
                g_k.append(k_b), g_v.append(v_b), g_ok.append(torch.ones(m, k_b.shape[1], dtype=torch.bool, device=dev))
            if row.rem_k is not None:
                g_k.append(row.rem_k), g_v.append(row.rem_v), g_ok.append(torch.ones(m, row.rem_k.shape[1], dtype=torch.bool, device=dev))
            # recent tokens already outside some queries' windows (a span's earliest queries see fewer)
            g_k.append(row.recent_k), g_v.append(row.recent_v), g_ok.append(dist >= cfg.n_local)
        if g_k:
            k_g = torch.cat(g_k, dim=1).repeat_interleave(groups, 0)
            logits.append((q_glob @ k_g.transpose(1, 2) * scaling).masked_fill(~torch.cat(g_ok, dim=1), float("-inf")))
            values.append(torch.cat(g_v, dim=1).repeat_interleave(groups, 0))
        probs = torch.softmax(torch.cat(logits, dim=-1).float(), dim=-1)  # one softmax over both stages
        row.recent_score = row.recent_score + probs[..., :R].sum(1)
        return probs.to(q_raw.dtype) @ torch.cat(values, dim=1)  # [H_q, m, D]

    def _evict(self, row: RowState) -> None:
        """Tokens that no later query can see in its window leave it: the first become the initial tokens, the
        rest wait in the remainder and are cut into blocks (dropped when topk is 0)."""
        cfg = self.cfg
        keep = cfg.n_local - 1  # the next query at count sees tokens count-n_local+1 .. count
        out = row.recent_k.shape[1] - keep
        if out <= 0:
            return
        k, v, s = row.recent_k[:, :out], row.recent_v[:, :out], row.recent_score[:, :out]
        row.recent_k, row.recent_v, row.recent_score = row.recent_k[:, out:], row.recent_v[:, out:], row.recent_score[:, out:]
        have = 0 if row.init_k is None else row.init_k.shape[1]
        take = min(out, cfg.n_init - have)
        if take > 0:
            row.init_k, row.init_v = _cat(row.init_k, k[:, :take], 1), _cat(row.init_v, v[:, :take], 1)
            k, v, s = k[:, take:], v[:, take:], s[:, take:]
        if cfg.topk == 0 or k.shape[1] == 0:
            return
        row.rem_k, row.rem_v, row.rem_score = _cat(row.rem_k, k, 1), _cat(row.rem_v, v, 1), _cat(row.rem_score, s, 1)
        bs = cfg.block_size
        while row.rem_k.shape[1] >= bs:
            k, v, s = row.rem_k[:, :bs], row.rem_v[:, :bs], row.rem_score[:, :bs]
            row.store.add(k, v, representative(k, s, cfg.repr_topk))
            row.rem_k, row.rem_v, row.rem_score = row.rem_k[:, bs:], row.rem_v[:, bs:], row.rem_score[:, bs:]


def representative(keys: torch.Tensor, score: torch.Tensor, r: int) -> torch.Tensor:
    """A block's representative [H_q * D]: per query head, the mean pre-RoPE key of the r tokens that head
    attended to most while they were in the window (keys [H_kv, n, D], score [H_q, n])."""
    Hq, D = score.shape[0], keys.shape[-1]
    k = keys.repeat_interleave(Hq // keys.shape[0], 0)  # [H_q, n, D]
    top = score.topk(r, dim=-1).indices  # [H_q, r]
    return k.gather(1, top[..., None].expand(-1, -1, D)).mean(1).reshape(-1)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: the context memory when the call's cache is one, sdpa otherwise."""
    layer = kwargs.pop("context_memory_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    B, _, c, _ = query.shape
    if attention_mask is None:
        valid = torch.ones(B, c, dtype=torch.bool, device=query.device)
    else:  # a token is padding when the mask hides it from itself
        diag = attention_mask[:, 0, :, -c:].diagonal(dim1=-2, dim2=-1)  # [B, c]
        valid = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, valid, kwargs["position_ids"].expand(B, -1), scaling), None


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
