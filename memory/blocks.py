"""Memory blocks of one sequence in one layer: their keys and values kept off the accelerator, their
representative vectors in a FAISS index, and a bounded least-recently-used cache of blocks on the device.

A block is `block_size` consecutive past tokens: keys (pre-RoPE) and values [H_kv, block_size, D] on the storage
device (the CPU; pinned when the model runs on CUDA, so copies to the device are asynchronous), plus one
representative vector [H_q * D] that retrieval scores by inner product. Blocks never change once stored, so a
copy of the store (a beam that forks, a prompt repeated into n samples) shares them by reference.

The index is FAISS `IndexFlatIP` (exact inner product). bench/faiss_index.py measured it against HNSW: at the
block counts a sequence reaches (a 64x-window passkey holds ~1,000 blocks per layer) flat search is exact and
as fast or faster; see docs/memory.md for the table.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


class BlockStore:
    def __init__(self, dim: int, device, max_cached: int):
        self.dim = dim
        self.device = torch.device(device)
        self.max_cached = max_cached
        self.keys: list[torch.Tensor] = []  # per block [H_kv, block_size, D], on the storage device
        self.values: list[torch.Tensor] = []
        self.reprs = np.zeros((0, dim), dtype=np.float32)  # [N, H_q * D]
        self.index = None  # a faiss.IndexFlatIP once the store first searches
        self.indexed = 0  # representatives already in self.index
        self.cached: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # block -> (k, v) on device
        self.loads = 0  # blocks copied to the device (misses of the cache)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: torch.Tensor, values: torch.Tensor, representative: torch.Tensor) -> None:
        """Store one block: keys/values [H_kv, block_size, D] leave the device; representative [H_q * D]."""
        pin = self.device.type == "cuda"
        self.keys.append(_offload(keys, pin))
        self.values.append(_offload(values, pin))
        rep = representative.detach().float().cpu().numpy()[None]
        self.reprs = np.concatenate([self.reprs, rep]) if len(self.reprs) else rep

    def search(self, query: torch.Tensor, topk: int) -> list[int]:
        """The `topk` blocks whose representatives have the largest inner product with query [H_q * D]."""
        n = len(self.keys)
        if n == 0 or topk == 0:
            return []
        if self.index is None:
            # imported here, not at module level: agent.policy imports this module, and faiss's OpenMP runtime
            # loaded beside torch's in every process slowed CPU fine-tunes on a loaded machine
            import faiss

            self.index, self.indexed = faiss.IndexFlatIP(self.dim), 0
        if self.indexed < n:  # representatives are indexed lazily: a copied store builds its own index once
            self.index.add(self.reprs[self.indexed:n])
            self.indexed = n
        _, ids = self.index.search(query.detach().float().cpu().numpy()[None], min(topk, n))
        return sorted(int(i) for i in ids[0] if i >= 0)  # in sequence order: what attention sees does not depend on rank

    def fetch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of blocks `ids` on the device, concatenated along time: [H_kv, len(ids) * block_size, D].
        A block not in the device cache is copied in; beyond `max_cached` the least recently used leave."""
        ks, vs = [], []
        for i in ids:
            if i in self.cached:
                self.cached.move_to_end(i)
            else:
                self.cached[i] = (self.keys[i].to(self.device, non_blocking=True),
                                  self.values[i].to(self.device, non_blocking=True))
                self.loads += 1
            k, v = self.cached[i]
            ks.append(k)
            vs.append(v)
        while len(self.cached) > self.max_cached:
            self.cached.popitem(last=False)
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def copy(self) -> "BlockStore":
        """An independent store sharing the (immutable) blocks; it builds its own index when it next searches."""
        other = BlockStore(self.dim, self.device, self.max_cached)
        other.keys, other.values, other.reprs = list(self.keys), list(self.values), self.reprs
        other.cached = OrderedDict(self.cached)
        return other

    def nbytes(self) -> tuple[int, int]:
        """(bytes of blocks cached on the device, bytes of all stored blocks)."""
        cached = sum(k.nbytes + v.nbytes for k, v in self.cached.values())
        stored = sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
        return cached, stored


def _offload(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    return t.pin_memory() if pin else t
