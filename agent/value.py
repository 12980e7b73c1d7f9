"""A value model: the probability that a (partial or finished) completion leads to a right answer.

A small head over a trunk's hidden states, one score per token position, so every prefix of a completion gets a
value in one forward: P(right answer | prompt + completion[:k]). It learns from finished completions the loop has
already labelled (the checker's verdicts, or label-free selection's accepted and rejected answers). A prefix's
target is the share of right answers among the same prompt's samples that begin with it (`prefix_targets`), and
the head is fitted with binary cross-entropy.

The trunk (ValueConfig.trunk, measured in docs/search.md): `tuned` (default), a copy of the policy trained with
the head, or `frozen`, the policy's own, read together with the policy's token log-probs and entropies along the
path (no second model; the features are computed once and the head trains in seconds, but it judges no better
than the policy's confidence).

    train_value(policy, labelled, cfg) -> ValueModel     labelled: [{"prompt", "completion", "label"}]
    ValueModel.score(prompts, completions, finished)     -> per-prefix values (list per completion)
    ValueModel.save(folder) / ValueModel.load(folder, policy)
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from agent.config import ValueConfig

HEAD_FILE = "value_head.pt"
CONFIG_FILE = "value_config.json"
TRUNK_DIR = "trunk"  # a tuned trunk's save_pretrained folder


def _head(features: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(features, 1)
    return nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, 1))


CONFIDENCE_FEATURES = 4


def _confidence(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Per position t, what the policy thought of the completion up to token t [B, T, 4]: the log-prob of token
    t, the entropy it was drawn from, and the running mean and minimum token log-prob over the completion's
    tokens (`answer` marks them): the confidence scorers' inputs, so that the value starts from what they know."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    answer = answer.float()
    tok_lp = torch.cat([torch.zeros_like(logp[:, :1, 0]), logp.gather(-1, ids[:, 1:, None])[..., 0]], 1) * answer
    ent = torch.cat([torch.zeros_like(logp[:, :1, 0]), -(logp.exp() * logp).sum(-1)], 1) * answer
    mean_lp = tok_lp.cumsum(1) / answer.cumsum(1).clamp(min=1)
    min_lp = torch.cummin(tok_lp, dim=1).values  # 0 until the first completion token
    return torch.stack([tok_lp, ent, mean_lp, min_lp], dim=-1)


class ValueModel:
    """A value head over a trunk: the policy's own (frozen) or a tuned copy of it. `forward_passes` and
    `scored_tokens` count the trunk forwards it ran, so that a benchmark reports what scoring cost beside what
    search generated."""

    def __init__(self, trunk, tokenizer, cfg: ValueConfig, head: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 meta: dict | None = None):
        self.trunk, self.tokenizer, self.cfg = trunk, tokenizer, cfg
        self.head = head.to(device=trunk.device, dtype=torch.float32).eval()
        self.mean, self.std = mean.to(trunk.device), std.to(trunk.device)
        self.meta = meta or {}
        self.forward_passes = 0
        self.scored_tokens = 0

    # ----- features -----

    def _sequences(self, prompts, completions, finished) -> tuple[list[list[int]], list[int]]:
        """Each prompt + completion (+ EOS when finished), and the index of the prompt's last token."""
        eos = self.tokenizer.eos_token_id
        seqs, starts = [], []
        for prompt, ids, done in zip(prompts, completions, finished):
            p = self.tokenizer(prompt, add_special_tokens=False).input_ids
            seqs.append(list(p) + list(ids) + ([eos] if done else []))
            starts.append(len(p) - 1)
        return seqs, starts

    def _hidden(self, seqs: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, int]:
        """The trunk's features [B, T, F] of left-padded `seqs` whose completions begin after `starts` (with
        gradients when the caller trains), and T."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        answer = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (seq, start) in enumerate(zip(seqs, starts)):
            ids[r, width - len(seq):] = torch.tensor(seq)
            mask[r, width - len(seq):] = 1
            answer[r, width - len(seq) + start + 1:] = True
        ids, mask, answer = ids.to(self.trunk.device), mask.to(self.trunk.device), answer.to(self.trunk.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        conf = self.cfg.confidence_features
        out = self.trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                         output_hidden_states=True, logits_to_keep=0 if conf else 1)
        self.forward_passes += 1
        self.scored_tokens += int(mask.sum())
        feats = [out.hidden_states[layer].float() for layer in self.cfg.layers]
        if conf:
            feats.append(_confidence(out.logits.float(), ids, answer))
        return torch.cat(feats, dim=-1), width

    @torch.inference_mode()
    def features(self, prompts: list[str], completions: list[list[int]], finished: list[bool]) -> list[torch.Tensor]:
        """Per completion, the trunk's features [k + 1 (+1 when finished), F] at the end of each prefix: the
        prompt's last token (k = 0), each completion token, and EOS for a finished one."""
        seqs, starts = self._sequences(prompts, completions, finished)
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad less
        for lo in range(0, len(order), self.cfg.max_rows):
            rows = order[lo: lo + self.cfg.max_rows]
            feats, width = self._hidden([seqs[i] for i in rows], [starts[i] for i in rows])
            for r, i in enumerate(rows):
                offset = width - len(seqs[i])
                out[i] = feats[r, offset + starts[i]: offset + len(seqs[i])]
        return out

    # ----- scoring -----

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head((feats - self.mean) / self.std)[..., 0]

    def score(self, prompts: list[str], completions: list[list[int]] | list[str],
              finished: list[bool] | None = None) -> list[list[float]]:
        """Per completion, the value after each prefix: [v(prompt), v(+token 1), ..., v(+EOS) when finished]. The
        last entry is the value of the whole (partial or finished) completion. Completions are token ids (or text,
        tokenized here); `finished` (default all True) says which end with EOS."""
        completions = [self.tokenizer(c, add_special_tokens=False).input_ids if isinstance(c, str) else list(c)
                       for c in completions]
        finished = [True] * len(completions) if finished is None else list(finished)
        if not (len(prompts) == len(completions) == len(finished)):
            raise ValueError("prompts, completions and finished must have one entry per completion")
        if not completions:
            return []
        feats = self.features(prompts, completions, finished)
        with torch.inference_mode():
            flat = torch.sigmoid(self._logits(torch.cat(feats))).tolist()
        out, at = [], 0
        for f in feats:
            out.append(flat[at: at + len(f)])
            at += len(f)
        return out

    # ----- persistence -----

    @property
    def accept_score(self) -> float | None:
        """Adaptive search's threshold for this model's values, set by search/calibration.py calibrate (None before)."""
        return self.meta.get("accept_score")

    def save(self, folder: str | Path) -> None:
        """The head (and a tuned trunk, as a save_pretrained folder) in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"head": self.head.state_dict(), "mean": self.mean.cpu(), "std": self.std.cpu()}, folder / HEAD_FILE)
        if self.cfg.trunk == "tuned":
            self.trunk.save_pretrained(folder / TRUNK_DIR)
        (folder / CONFIG_FILE).write_text(json.dumps({"config": asdict(self.cfg), "features": int(self.mean.numel()),
                                                       "meta": self.meta}, indent=2))

    @classmethod
    def load(cls, folder: str | Path, policy) -> "ValueModel":
        """A saved value model for `policy` (the one it was trained on: a frozen head reads its trunk)."""
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / HEAD_FILE).is_file():
            raise ValueError(f"{folder} holds no value model ({CONFIG_FILE} and {HEAD_FILE}): train one first")
        saved = json.loads((folder / CONFIG_FILE).read_text())
        cfg = ValueConfig(**saved["config"])
        state = torch.load(folder / HEAD_FILE, map_location="cpu", weights_only=True)
        head = _head(saved["features"], cfg.hidden)
        head.load_state_dict(state["head"])
        model = policy.model
        if cfg.trunk == "tuned":
            trunk = AutoModelForCausalLM.from_pretrained(folder / TRUNK_DIR, local_files_only=True)
            trunk.to(device=model.device, dtype=model.dtype).eval()
        else:
            trunk = model
        width = len(cfg.layers) * int(trunk.config.hidden_size) + CONFIDENCE_FEATURES * cfg.confidence_features
        if width != saved["features"]:
            raise ValueError(f"the value model in {folder} reads {saved['features']} features but this policy gives "
                             f"{width}: it was trained on another policy")
        return cls(trunk, policy.tokenizer, cfg, head, state["mean"], state["std"], saved.get("meta"))


def _trainable_copy(model):
    """A copy of the policy's weights to tune as the value model's trunk (a LoRA policy merged first)."""
    from agent.adapters import is_adapter, merged_copy

    trunk = merged_copy(model) if is_adapter(model) else copy.deepcopy(model)
    return trunk.requires_grad_(True)


def prefix_targets(prompts: list[str], completions: list[list[int]], labels: list[bool]) -> list[list[float]]:
    """Each prefix's target: the share of right answers among the labelled completions of the same prompt that
    begin with that prefix (a Monte Carlo estimate from the search's own samples, as Math-Shepherd estimates a
    step's value from rollouts, without new rollouts). A prefix only wrong answers share gets 0 at its first wrong
    token, where a broadcast outcome label would also blame the right tokens before it. Entries: the prompt alone,
    then each completion token, then EOS (the completion's own label)."""
    right: dict[tuple, int] = {}
    seen: dict[tuple, int] = {}
    for prompt, ids, label in zip(prompts, completions, labels):
        for k in range(len(ids) + 1):
            key = (prompt, tuple(ids[:k]))
            seen[key] = seen.get(key, 0) + 1
            right[key] = right.get(key, 0) + int(label)
    return [[right[(prompt, tuple(ids[:k]))] / seen[(prompt, tuple(ids[:k]))] for k in range(len(ids) + 1)]
            + [float(label)] for prompt, ids, label in zip(prompts, completions, labels)]


def train_value(policy, labelled: list[dict], cfg: ValueConfig | None = None,
                start: ValueModel | None = None) -> ValueModel:
    """A value model for `policy`, fitted to labelled finished completions [{"prompt", "completion" (text),
    "label" (bool: right)}]. Each completion's label is the target of all its prefixes; each completion weighs
    the same however long it is, and right and wrong ones weigh half each, so that a policy that is mostly right
    still learns what its mistakes look like. A frozen trunk's features are computed once and only the head
    trains; a tuned trunk (a copy of the policy) trains with the head. With `start` (a tuned value model, the
    current version's), training continues from a copy of its trunk, head and feature scale, as the loop's policy
    continues from the current version: each cycle adds what its labels teach to what the earlier ones taught."""
    cfg = cfg or ValueConfig()
    if start is not None and not (cfg.trunk == start.cfg.trunk == "tuned"):
        raise ValueError("only a tuned value model continues training (start has a frozen trunk, or cfg asks for one)")
    if not labelled:
        raise ValueError("train_value needs labelled completions: none were given")
    labels = [bool(e["label"]) for e in labelled]
    if all(labels) or not any(labels):
        raise ValueError("train_value needs both right and wrong completions to learn from (got only "
                         f"{'right' if labels[0] else 'wrong'} ones)")
    tok = policy.tokenizer
    prompts = [e["prompt"] for e in labelled]
    ids = [tok(e["completion"], add_special_tokens=False).input_ids for e in labelled]
    targets = prefix_targets(prompts, ids, labels)  # from every sample: repeats are the Monte Carlo counts
    n_right = sum(labels)
    class_w = {True: 0.5 * len(labels) / n_right, False: 0.5 * len(labels) / (len(labels) - n_right)}
    # a repeated completion is trained once with its count as weight: the same loss, fewer forwards
    unique: dict[tuple, int] = {}
    weights: list[float] = []
    for i, (prompt, seq, label) in enumerate(zip(prompts, ids, labels)):
        key = (prompt, tuple(seq))
        if key not in unique:
            unique[key] = len(weights)
            weights.append(0.0)
        weights[unique[key]] += class_w[label]
    keep = _first_of_each(prompts, ids)  # in the order of `unique`
    prompts, ids, targets = [prompts[i] for i in keep], [ids[i] for i in keep], [targets[i] for i in keep]
    if start is not None:
        trunk = copy.deepcopy(start.trunk).requires_grad_(True)
        vm = ValueModel(trunk, tok, cfg, copy.deepcopy(start.head), start.mean, start.std)
        feats = None
    else:
        trunk = _trainable_copy(policy.model) if cfg.trunk == "tuned" else policy.model
        probe = ValueModel(trunk, tok, cfg, _head(1, 0), torch.zeros(1), torch.ones(1))
        feats = probe.features(prompts, ids, [True] * len(ids))  # the untrained trunk's: the head's input scale
        x = torch.cat(feats)
        mean, std = x.mean(0), x.std(0).clamp(min=1e-4)
        torch.manual_seed(cfg.seed)
        vm = ValueModel(trunk, tok, cfg, _head(x.shape[1], cfg.hidden), mean, std)
    vm.head.train()
    began = time.monotonic()
    if cfg.trunk == "frozen":
        steps, loss = _fit_head(vm, feats, targets, weights, cfg, began)
    else:
        steps, loss = _fit_tuned(vm, prompts, ids, targets, weights, cfg, began)
        trunk.requires_grad_(False)
    vm.head.eval()
    trunk.eval()
    vm.meta = {"completions": len(labelled), "distinct": len(ids), "right": n_right,
               "prefixes": sum(len(t) for t in targets), "steps": steps, "final_loss": round(loss, 4),
               "train_s": round(time.monotonic() - began, 2), "trunk": cfg.trunk,
               "policy": getattr(policy, "version", None),
               "steps_in_all": steps + (start.meta.get("steps_in_all", start.meta.get("steps", 0)) if start else 0)}
    vm.forward_passes = vm.scored_tokens = 0
    return vm


def _first_of_each(prompts, ids) -> list[int]:
    seen, keep = set(), []
    for i, key in enumerate(zip(prompts, map(tuple, ids))):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def _fit_head(vm: ValueModel, feats, targets, weights, cfg: ValueConfig, start: float) -> tuple[int, float]:
    """The head alone on the frozen trunk's features, computed once."""
    x = torch.cat(feats)
    y = torch.tensor([t for ts in targets for t in ts], device=x.device)
    w = torch.cat([torch.full((len(f),), wt / len(f)) for f, wt in zip(feats, weights)]).to(x.device)
    w = w / w.mean()
    opt = torch.optim.AdamW(vm.head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps, loss = 0, torch.tensor(0.0)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for lo in range(0, len(perm), cfg.batch_size):
            b = perm[lo: lo + cfg.batch_size]
            bce = nn.functional.binary_cross_entropy_with_logits(vm._logits(x[b]), y[b], reduction="none")
            loss = (bce * w[b]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        if time.monotonic() - start > cfg.time_budget_s:
            break
    return steps, loss.item()


def _fit_tuned(vm: ValueModel, prompts, ids, targets, weights, cfg: ValueConfig, start: float) -> tuple[int, float]:
    """Trunk and head together, `cfg.trunk_batch` completions per step, every prefix of each one a target."""
    seqs, starts = vm._sequences(prompts, ids, [True] * len(ids))
    params = [{"params": vm.head.parameters(), "lr": cfg.learning_rate},
              {"params": vm.trunk.parameters(), "lr": cfg.trunk_learning_rate}]
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    vm.trunk.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    steps, loss = 0, torch.tensor(0.0)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(seqs), generator=gen).tolist()
        for lo in range(0, len(perm), cfg.trunk_batch):
            rows = perm[lo: lo + cfg.trunk_batch]
            feats, width = vm._hidden([seqs[i] for i in rows], [starts[i] for i in rows])
            logits = vm._logits(feats)  # [B, T]
            target = torch.zeros_like(logits)
            weight = torch.zeros_like(logits)
            for r, i in enumerate(rows):
                first = width - len(seqs[i]) + starts[i]  # the prompt's last token: the first prefix
                target[r, first:] = torch.tensor(targets[i], device=target.device)
                weight[r, first:] = weights[i] / (width - first)
            bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = (bce * weight).sum() / sum(weights[i] for i in rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.monotonic() - start > cfg.time_budget_s:
                return steps, loss.item()
    return steps, loss.item()


def value_vote(result, task):
    """Majority vote with each candidate's vote weighed by its value (its `score` after ranking by the `value`
    scorer): the answer with the most value behind it, stated by its highest-valued candidate. The best-ranked
    candidate when no finished candidate is well formed."""
    support: dict[str, float] = {}
    for c in result.candidates:
        answer = task.extract(result.problem, c.completion) if c.finished else None
        if answer is not None:
            support[answer] = support.get(answer, 0.0) + c.score
    if not support:
        return result.best
    top = max(support, key=support.get)
    return max((c for c in result.candidates if c.finished and task.extract(result.problem, c.completion) == top),
               key=lambda c: c.score)
