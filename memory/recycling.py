"""Token Recycling (Luo et al., ACL 2025, arXiv 2408.08696): drafts from candidate tokens that earlier forwards
already computed, verified losslessly in one Decoder tree step.

The memory is an int32 matrix `adj` [vocab, k]: row t holds the top-k tokens last predicted after token t
(column 0 the most likely). Every forward the Decoder makes updates it from the top-k at every input position,
rejected drafts included (`observe`). A draft tree is filled from it breadth-first, one gather per depth: a
node's token is `adj[parent's token, node's column]`. The matrix persists across problems and jobs ("hot
start") and is saved beside each policy version, so a worker starts warm.

The tree is sized to the device (`TreeSizer`): the forward cost of n draft tokens is measured on the current
device and model, acceptance is counted per tree node, and the template is pruned to the node count that
maximises expected accepted tokens per unit of forward cost. On a CPU an 81-token verify costs 2-3.4x a
one-token step (measured), so the paper's 80-node tree would need ~6 accepted tokens per forward to double the
speed; a 16-node tree costs 1.2-2.1x and needs MAT 2.5-3.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from search.decoder import Decoder, tree_paths

# The paper's template "2.2.2": each node is its path of adj columns from the root; 80 drafts, depths 8/21/25/15/8/3.
PAPER_TREE: list[tuple[int, ...]] = (
    [(i,) for i in range(8)]
    + [(0, i) for i in range(8)] + [(1, i) for i in range(4)] + [(2, i) for i in range(3)] + [(3, 0), (3, 1)]
    + [(4, 0), (5, 0), (6, 0), (7, 0)]
    + [(0, 0, i) for i in range(8)] + [(0, 1, i) for i in range(3)] + [(0, 2, 0), (0, 2, 1)]
    + [(0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0),
       (4, 0, 0), (5, 0, 0)]
    + [(0, 0, 0, i) for i in range(5)] + [(0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0),
                                          (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0)]
    + [(0, 0, 0, 0, i) for i in range(3)] + [(0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0), (0, 1, 0, 0, 0),
                                             (1, 0, 0, 0, 0)]
    + [(0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0)]
)


# What the sizer chooses from: the paper's template grown by a deeper greedy chain (column 0 down to depth 16),
# for outputs that copy long spans (code); the sizer keeps only the nodes that pay on the device.
CANDIDATE_TREE: list[tuple[int, ...]] = PAPER_TREE + [(0,) * d for d in range(7, 17)]


class DraftTree:
    """A tree shape in breadth-first order: node 0 is the root (the last accepted token), node i > 0 the path of
    adj columns `paths[i]`. Prefix-closed: every node's parent is in the tree."""

    def __init__(self, paths: list[tuple[int, ...]]):
        ordered = [()] + sorted(set(paths), key=lambda p: (len(p), paths.index(p)))
        index = {p: i for i, p in enumerate(ordered)}
        missing = [p for p in ordered[1:] if p[:-1] not in index]
        if missing:
            raise ValueError(f"a draft tree must be prefix-closed: {missing[:3]} have no parent in the tree")
        self.paths = ordered
        self.parents = [-1] + [index[p[:-1]] for p in ordered[1:]]
        self.columns = [0] + [p[-1] for p in ordered[1:]]
        self.depths = [len(p) for p in ordered]
        # nodes per depth with their parents and columns, for one gather per depth
        self.levels = []
        for d in range(1, max(self.depths) + 1):
            nodes = [i for i, dd in enumerate(self.depths) if dd == d]
            self.levels.append((torch.tensor(nodes), torch.tensor([self.parents[i] for i in nodes]),
                                torch.tensor([self.columns[i] for i in nodes])))
        self._levels_on: dict[str, list] = {}
        self.levels_numpy = [tuple(t.numpy() for t in level) for level in self.levels]

    def __len__(self) -> int:
        return len(self.paths)

    def levels_on(self, device) -> list:
        """The per-depth index tensors on `device`, moved once rather than at every draft."""
        key = str(device)
        if key not in self._levels_on:
            self._levels_on[key] = [tuple(t.to(device) for t in level) for level in self.levels]
        return self._levels_on[key]

    def max_column(self) -> int:
        return max(self.columns)


@functools.lru_cache(maxsize=64)
def _draft_tree(paths: tuple[tuple[int, ...], ...]) -> DraftTree:
    """One DraftTree per shape, shared (never changed once built): building it was a third of a version load."""
    return DraftTree(list(paths))


class RecyclingMemory:
    """The recycling matrix and its draft tree; a Decoder `DraftSource`."""

    def __init__(self, vocab_size: int, k: int = 8, tree: list[tuple[int, ...]] | None = None, device="cpu",
                 size_to_device: bool = True):
        self.k = k
        self.size_to_device = size_to_device  # False keeps `tree` as given (the paper's template, for comparison)
        self.adj = torch.zeros(vocab_size, k, dtype=torch.int32, device=device)  # unwritten rows draft token 0
        self.set_tree(tree if tree is not None else CANDIDATE_TREE)
        self.accept_counts = torch.zeros(len(CANDIDATE_TREE) + 1)  # per candidate node: times on the accepted path
        self._pending: list[torch.Tensor] = []  # accepted end nodes not yet counted (see `_fold`)
        self.steps = 0
        self._sized: dict[tuple[int, int], list[tuple[int, ...]] | None] = {}  # (batch, context) buckets -> tree
        self._trials: dict[int, DraftTrial] = {}  # batch bucket -> drafted vs one-token decodes, measured

    # verify steps run with the whole template before the tree is sized: the rates need samples
    WARMUP_STEPS = 64
    # warm-up drafting runs at batches up to this size, or wherever a whole-template step costs at most
    # WARMUP_MAX_COST one-token steps (a large GPU); elsewhere a cold memory does not draft
    WARMUP_MAX_BATCH = 8
    WARMUP_MAX_COST = 1.5

    def ready(self, decoder, batch: int, context: int) -> bool:
        """Whether this greedy decode drafts, with the tree sized for it.

        Warm-up: until WARMUP_STEPS verify steps have been counted, the whole template drafts where warm-up is
        cheap (see WARMUP_MAX_BATCH, WARMUP_MAX_COST), and nothing drafts elsewhere. Then, per power-of-two
        bucket of batch and context, the sizer picks the tree that maximises expected tokens per unit of measured
        forward cost, or none when its expected speedup over one-token steps is not above 1 (a large batch on a
        CPU is already compute-bound). Where it picks a tree, a trial decides (see `finished`)."""
        if not self.size_to_device:
            return True
        key = (_bucket(batch), _bucket(context))
        if self.steps < self.WARMUP_STEPS:
            cheap = batch <= self.WARMUP_MAX_BATCH
            if not cheap:
                whole = len(CANDIDATE_TREE) + 1
                costs = TreeSizer.forward_costs(_plain(decoder), batch=key[0], context=key[1], sizes=(1, whole))
                cheap = whole in costs and costs[whole] <= self.WARMUP_MAX_COST * costs[1]
            if cheap and len(self.tree) != len(CANDIDATE_TREE) + 1:
                self.set_tree(CANDIDATE_TREE)
            return cheap
        if key not in self._sized:
            costs = TreeSizer.forward_costs(_plain(decoder), batch=key[0], context=key[1],
                                            stop_above=1.0 + sum(self.acceptance_rates().values()))
            tree, gain = TreeSizer.choose(self.acceptance_rates(), costs)
            self._sized[key] = tree if gain > 1.0 else None
        tree = self._sized[key]
        if tree is None:
            return False
        trial = self._trials.setdefault(key[0], DraftTrial())
        if not trial.drafts():
            return False
        if self.tree.paths[1:] != sorted(tree, key=lambda p: (len(p), tree.index(p))):
            self.set_tree(tree)
        return True

    def finished(self, decoder, batch: int, context: int, seconds: float, tokens: int, drafted: bool) -> None:
        """The measured rule: the sizer's cost model leaves out the loop's own work (compaction, masked holes,
        bookkeeping), which decides the matter at CPU batch sizes where a verify step costs almost as much as the
        tokens it checks. So, per batch bucket, drafted and one-token greedy decodes take turns until each has
        emitted DraftTrial.TOKENS tokens, and the faster in tokens per second stays. Turns rather than one
        decode against a cost measured earlier: a busy machine slows both alike (one slow drafted decode on a
        loaded 2-core machine used to switch drafting off for good)."""
        trial = self._trials.get(_bucket(batch))
        if trial is not None and self.size_to_device:
            trial.record(drafted, seconds, tokens)

    def trials(self) -> dict[str, dict]:
        """Per batch bucket: each arm's measured tokens per second and the decision (None while undecided)."""
        return {f"batch {b}": t.summary() for b, t in self._trials.items()}

    def set_tree(self, paths: list[tuple[int, ...]]) -> None:
        if getattr(self, "_pending", None):
            self._fold()  # the pending end nodes index the old tree
        tree = _draft_tree(tuple(paths))
        if tree.max_column() >= self.k:
            raise ValueError(f"the tree uses adj column {tree.max_column()} but the memory keeps k={self.k} successors")
        self.tree = tree
        # each draft node's slot among the candidates (-1: not a candidate), for acceptance statistics
        self._candidate_slots = torch.tensor([CANDIDATE_INDEX.get(p, -1) for p in tree.paths[1:]], dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return self.adj.numel() * self.adj.element_size()

    def propose(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Draft trees [B, n] rooted at each row's last accepted token; one gather per depth."""
        if self.adj.device.type == "cpu" and last_tokens.device.type == "cpu":
            return self._propose_numpy(last_tokens), self.tree.parents
        tokens = torch.empty(last_tokens.shape[0], len(self.tree), dtype=torch.long, device=last_tokens.device)
        tokens[:, 0] = last_tokens
        for nodes, parents, columns in self.tree.levels_on(tokens.device):
            tokens[:, nodes] = self.adj[tokens[:, parents], columns].long()
        return tokens, self.tree.parents

    def _propose_numpy(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """`propose` on the CPU through a numpy view of the matrix: a deep chain is one small gather per depth,
        and numpy's fancy indexing costs about a microsecond where torch's dispatch costs tens (a 15-node
        tree's proposal measured 0.64 ms a step through torch on the 2-core machine)."""
        adj = self.adj.numpy()  # shares memory: observe() writes the matrix in place
        tokens = np.empty((last_tokens.shape[0], len(self.tree)), dtype=np.int64)
        tokens[:, 0] = last_tokens.numpy()
        for nodes, parents, columns in self.tree.levels_numpy:
            tokens[:, nodes] = adj[tokens[:, parents], columns]
        return torch.from_numpy(tokens)

    def observe(self, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Recycle: the top-k successors at every input position replace their token's row (all tree nodes,
        rejected drafts included; with repeated tokens the last write wins)."""
        top = logits.topk(self.k, dim=-1).indices.to(device=self.adj.device, dtype=torch.int32)
        self.adj[input_ids.reshape(-1).to(self.adj.device)] = top.reshape(-1, self.k)

    def copy(self, size_to_device: bool | None = None) -> "RecyclingMemory":
        """An independent copy: matrix, tree and acceptance statistics (sized trees are chosen afresh)."""
        other = RecyclingMemory(self.adj.shape[0], self.k, tree=self.tree.paths[1:], device=self.adj.device,
                                size_to_device=self.size_to_device if size_to_device is None else size_to_device)
        other.adj.copy_(self.adj)
        self._fold()
        other.accept_counts, other.steps = self.accept_counts.clone(), self.steps
        return other

    def sized_trees(self) -> dict[str, int]:
        """Draft nodes chosen per (batch, context) bucket so far; 0 where drafting was switched off."""
        return {f"batch {b}, context {c}": (len(t) if t else 0) for (b, c), t in self._sized.items()}

    def accepted(self, best_nodes: torch.Tensor) -> None:
        """Note which node ended each row's accepted path; folded into per-candidate counts when they are read
        (`_fold`), so a verify step pays for a list append rather than a host copy and a scatter."""
        self._pending.append(best_nodes)
        self.steps += len(best_nodes)

    def _fold(self) -> None:
        """Count, per candidate node, how often it lay on a row's accepted path (the tree sizer's statistics):
        the rows' end nodes counted once, then pushed to their ancestors through the ancestor matrix."""
        if not self._pending:
            return
        ends = torch.cat([b.reshape(-1) for b in self._pending]).cpu()
        self._pending = []
        _, _, anc = tree_paths(self.tree.parents)
        on_path = (torch.bincount(ends, minlength=len(self.tree)).float() @ anc.float())[1:]  # [n - 1]
        known = self._candidate_slots >= 0
        self.accept_counts.index_add_(0, self._candidate_slots[known] + 1, on_path[known])
        self.accept_counts[0] += len(ends)

    def acceptance_rates(self) -> dict[tuple[int, ...], float]:
        """Per candidate path: the share of verify steps in which it was on the accepted path."""
        self._fold()
        total = max(1.0, float(self.accept_counts[0]))
        return {p: float(self.accept_counts[i + 1]) / total for i, p in enumerate(CANDIDATE_TREE)}

    # ----- persistence: beside each policy version -----

    def save(self, folder: str | Path) -> None:
        """`recycling.safetensors` in `folder` (k and the tree as metadata): an adapter swap reads it every time, and
        unpickling the older recycling.pt took 3 ms of a 3.5 ms swap on a 21M Llama."""
        self._fold()
        save_file({"adj": self.adj.cpu().contiguous(), "accept_counts": self.accept_counts.contiguous()},
                  str(Path(folder) / RECYCLING_FILE),
                  metadata={"k": str(self.k), "tree": json.dumps([list(p) for p in self.tree.paths[1:]])})

    @classmethod
    def load(cls, folder: str | Path, vocab_size: int, device="cpu") -> "RecyclingMemory":
        """The memory saved beside a policy version (recycling.safetensors, or an older version's recycling.pt), or a
        fresh one when there is none (or its shape differs)."""
        folder = Path(folder)
        if (folder / RECYCLING_FILE).is_file():
            with safe_open(str(folder / RECYCLING_FILE), framework="pt") as f:
                meta = f.metadata()
                state = {"adj": f.get_tensor("adj"), "accept_counts": f.get_tensor("accept_counts"),
                         "k": int(meta["k"]), "tree": json.loads(meta["tree"])}
        elif (folder / "recycling.pt").is_file():
            state = torch.load(folder / "recycling.pt", map_location="cpu", weights_only=True)
        else:
            return cls(vocab_size, device=device)
        if state["adj"].shape[0] != vocab_size:
            return cls(vocab_size, device=device)
        memory = cls(vocab_size, k=state["k"], tree=[tuple(p) for p in state["tree"]], device=device)
        memory.adj.copy_(state["adj"].to(device))
        counts = state["accept_counts"]
        memory.accept_counts[: len(counts)] = counts[: len(memory.accept_counts)]
        return memory


RECYCLING_FILE = "recycling.safetensors"
CANDIDATE_INDEX = {p: i for i, p in enumerate(CANDIDATE_TREE)}


class DraftTrial:
    """Drafted against one-token greedy decodes at one batch size: they take turns (the arm with fewer tokens
    goes next) until each has emitted TOKENS tokens; then the arm with more tokens per second is kept."""

    TOKENS = 256

    def __init__(self):
        self.seconds = {True: 0.0, False: 0.0}
        self.tokens = {True: 0, False: 0}
        self.decision: bool | None = None

    def drafts(self) -> bool:
        if self.decision is not None:
            return self.decision
        return self.tokens[True] <= self.tokens[False]

    def record(self, drafted: bool, seconds: float, tokens: int) -> None:
        if self.decision is not None or tokens == 0:
            return
        self.seconds[drafted] += seconds
        self.tokens[drafted] += tokens
        if min(self.tokens.values()) >= self.TOKENS:
            self.decision = self.rate(True) > self.rate(False)

    def rate(self, drafted: bool) -> float:
        return self.tokens[drafted] / self.seconds[drafted] if self.seconds[drafted] > 0 else 0.0

    def summary(self) -> dict:
        return {"drafted_tokens_per_s": round(self.rate(True), 1), "one_token_tokens_per_s": round(self.rate(False), 1),
                "tokens": dict(drafted=self.tokens[True], one_token=self.tokens[False]), "drafting": self.decision}


class TreeSizer:
    """Chooses the draft tree for a device: the template pruned to the size that maximises expected accepted
    tokens per unit of forward cost, from measured forward costs and running acceptance rates."""

    SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 81, 91)  # tree inputs (root included) at which cost is measured
    _costs: dict[tuple, dict] = {}  # (device, model, batch, context) -> inputs -> seconds; per process

    @classmethod
    @torch.inference_mode()
    def forward_costs(cls, decoder, batch: int = 1, context: int = 128, repeats: int = 5,
                      stop_above: float = float("inf"), sizes: tuple[int, ...] | None = None) -> dict[int, float]:
        """Median seconds of one tree step with n inputs after `context` cached tokens, for n in SIZES (cached per
        device, model, batch and context; well under a second for tiny models). Sizes stop once a step costs
        more than `stop_above` one-token steps: no tree that large can pay."""
        sizes = sizes or cls.SIZES
        key = (str(decoder.device), decoder.model.config.to_json_string(), batch, context)
        entry = cls._costs.setdefault(key, {})  # inputs -> seconds, and "stopped" once a size could not pay
        todo = [n for n in sizes if n not in entry]
        if todo and not entry.get("stopped"):
            ids = torch.full((batch, context), decoder.eos, dtype=torch.long, device=decoder.device)
            mask = torch.ones_like(ids)
            cache, _ = decoder.prefill(ids, mask)  # one prefill; every timed step is cropped off again
            for n in todo:
                tree = torch.full((batch, n), decoder.eos, dtype=torch.long, device=decoder.device)
                times = []
                for _ in range(repeats if batch * n <= 4096 else 2):  # large steps: two timings suffice
                    _sync(decoder.device)
                    t = time.perf_counter()
                    decoder.tree_step(ids, mask, cache, tree, [-1] + [0] * (n - 1))
                    _sync(decoder.device)
                    times.append(time.perf_counter() - t)
                    decoder.crop(cache, context)
                entry[n] = sorted(times)[len(times) // 2]
                if 1 in entry and entry[n] / entry[1] > stop_above:
                    entry["stopped"] = True
                    break
        return {n: c for n, c in entry.items() if n != "stopped"}

    @staticmethod
    def choose(rates: dict[tuple[int, ...], float], costs: dict[int, float]) -> tuple[list[tuple[int, ...]], float]:
        """The prefix-closed subset of the template with the best expected tokens per second, and that speed
        relative to one-token greedy steps (<= 1: drafting does not pay here). Expected tokens of a verify step
        = 1 (the bonus token) + the summed acceptance rates of its draft nodes."""
        order = sorted(CANDIDATE_TREE, key=lambda p: (-rates.get(p, 0.0), len(p), CANDIDATE_INDEX[p]))
        chosen, best, best_gain = [], [], 0.0
        base = costs[1]
        for p in order:
            if p[:-1] and p[:-1] not in chosen:
                continue  # keep the tree prefix-closed: a node needs its parent
            n = len(chosen) + 2
            if n > max(costs):
                break  # not measured: forward_costs stopped because no tree this large can pay
            chosen.append(p)
            cost = _interpolate(costs, n)
            gain = (1.0 + sum(rates.get(q, 0.0) for q in chosen)) / (cost / base)
            if gain > best_gain:
                best, best_gain = list(chosen), gain
        return best, best_gain


def _interpolate(costs: dict[int, float], n: int) -> float:
    sizes = sorted(costs)
    if n in costs:
        return costs[n]
    lo = max(s for s in sizes if s <= n)
    hi = min((s for s in sizes if s >= n), default=sizes[-1])
    if hi == lo:
        return costs[lo]
    return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)


def _plain(decoder):
    """A decoder without a draft source: calibration forwards must not be recycled into the matrix."""
    return Decoder(decoder.model, decoder.tokenizer)


def _bucket(n: int) -> int:
    """The power of two at or above n: forward costs are measured once per bucket."""
    return 1 << max(0, (n - 1).bit_length())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


