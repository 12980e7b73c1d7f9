"""Train a candidate, judge it against the current policy, and the one rule that decides promotion.

The loop (agent/loop.py), the store-driven train cycle (agent/train_cycle.py) and an operator (the API and the CLI)
all promote by `beats`; the write itself is one compare-and-set in the store (agent/store.py `promote_in`): a
candidate judged against its parent is promoted only while that parent is still the promoted version.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, replace
from pathlib import Path

from agent import distributed
from agent.config import LoopConfig, PreferenceConfig, TrainConfig
from agent.evaluation import Evaluation, evaluate_policy
from agent.policy import Policy
from agent.trainer import DPOFineTuner, SFTFineTuner, clone_for_training
from search import SearchConfig
from tasks import Problem, Task


def beats(candidate_score: float, current_score: float, margin: float) -> bool:
    """The promotion rule: a candidate must beat the current policy's gate score by more than `margin`."""
    return candidate_score > current_score + margin


def promote_margin(settings) -> float:
    """The deployment's margin (ARBOR_PROMOTE_MARGIN), else LoopConfig's default."""
    return settings.promote_margin if settings.promote_margin is not None else LoopConfig.promote_margin


def train_candidate(current: Policy, examples: list[dict], pairs: list[dict], train: TrainConfig, method: str,
                    preference: PreferenceConfig) -> tuple[object, dict]:
    """A fine-tuned copy of `current`'s model and the fine-tune's stats: SFT on `examples`, DPO on `pairs`
    (agent/preference.py), or DPO after SFT (method sft+dpo; with no pairs, SFT gets DPO's time so that a cycle costs
    the same). The copy leaves `current` untouched: a rejected candidate costs nothing but its time."""
    model = clone_for_training(current.model)
    stats: dict = {}
    if method == "sft+dpo" and not pairs:
        train = replace(train, time_budget_s=train.time_budget_s + preference.time_budget_s)
    if method in ("sft", "sft+dpo"):
        distributed.share_fine_tune(current.version, examples, train)  # other ranks of a multi-process launch join it
        stats = SFTFineTuner(train).train(model, current.tokenizer, examples)
    if method in ("dpo", "sft+dpo"):
        dpo = DPOFineTuner(preference).train(model, current.tokenizer, pairs) if pairs else {"steps": 0, "seconds": 0.0}
        stats["dpo"] = {**dpo, "pairs": len(pairs)}
    return model, stats


@dataclass(frozen=True)
class Verdict:
    """A candidate judged against the current policy on the same held-out problems with the same search."""

    promote: bool
    candidate: Evaluation
    current: Evaluation  # the current policy's evaluation, completed at every key the scores compare
    candidate_score: float
    current_score: float
    keys: list[str]  # the held-out keys the scores average over
    seconds: float

    def metrics(self) -> dict:
        """What the candidate's version records."""
        return {"heldout": self.candidate.accuracy, "self_verified": self.candidate.self_verified,
                "gate_score": self.candidate_score, "current_gate_score": self.current_score, "gate_keys": self.keys}


def judge(candidate: Policy, current: Policy, heldout: dict[str, list[Problem]], search: SearchConfig, task: Task | None,
          mode: str, margin: float, keys: list[str] | None = None, current_eval: Evaluation | None = None) -> Verdict:
    """Evaluate the candidate and compare gate scores over `keys` (default: every held-out key). `current_eval` is what
    the current policy already scored (the loop keeps it between cycles): it is evaluated only at the keys missing."""
    t = time.monotonic()
    cand = evaluate_policy(candidate, heldout, search, task, keys, mode)
    keys = [k for k in (keys if keys is not None else sorted(heldout)) if k in cand.metric]
    cur = current_eval if current_eval is not None else Evaluation(mode)
    missing = {k: heldout[k] for k in keys if k not in cur.metric}
    if missing:
        cur = cur.merged(evaluate_policy(current, missing, search, task, keys, mode))
    cand_score, cur_score = cand.score(keys), cur.score(keys)
    return Verdict(beats(cand_score, cur_score, margin), cand, cur, cand_score, cur_score, keys, time.monotonic() - t)


class PromotionRefused(ValueError):
    """An operator's promotion or rollback that the rules refuse (one line: why, and what to do)."""


class UnknownVersion(KeyError):
    """A policy version the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


def promote_by_operator(store, version: str, margin: float) -> dict:
    """Promote `version` by the gate's rule: its recorded gate score must beat the promoted version's by more than
    `margin`. A version that was promoted before (retired) passed the gate once and may come back; one never gated (no
    gate score) is refused. The write is a compare-and-set on the promoted version this decision read."""
    rows = {r.version: r for r in store.policies()}
    row = rows.get(version)
    if row is None:
        raise UnknownVersion(f"no policy version {version!r}: `arbor policies` lists them")
    if row.status == "promoted":
        raise PromotionRefused(f"{version} is already the promoted version")
    if not Path(row.path).is_dir():
        raise PromotionRefused(f"{version}'s checkpoint {row.path} is missing: it cannot be served")
    current = next((r for r in rows.values() if r.status == "promoted"), None)
    if row.status != "retired" and current is not None:
        score = (row.metrics or {}).get("gate_score")
        if score is None:
            raise PromotionRefused(f"{version} was never gated (no gate score): register your own model with "
                                   "`arbor policies add PATH`")
        reference = (current.metrics or {}).get("gate_score")
        if reference is None:  # the promoted version was never gated (v0, an added model): what the gate measured
            reference = (row.metrics or {}).get("current_gate_score", 0.0)
        if not beats(score, reference, margin):
            raise PromotionRefused(f"{version}'s gate score {score:.3f} does not beat {current.version}'s "
                                   f"{reference:.3f} by more than the promote margin {margin:g}: not promoted")
    previous = current.version if current else None
    if not store.promote_policy(version, expected=previous):
        raise PromotionRefused(f"the promoted version changed while {version} was being checked: try again")
    return {"promoted": version, "previous": previous}


def rollback(store) -> dict:
    """Promote the version that was promoted before the current one; the current one is marked rejected (so a second
    rollback goes one further back)."""
    rows = store.policies()
    current = next((r for r in rows if r.status == "promoted"), None)
    if current is None:
        raise PromotionRefused("no version is promoted: nothing to roll back")
    earlier = sorted((r for r in rows if r.status == "retired" and r.promoted_at is not None and Path(r.path).is_dir()),
                     key=lambda r: r.promoted_at)
    if not earlier:
        raise PromotionRefused(f"{current.version} is the only version ever promoted: nothing to roll back to")
    previous = earlier[-1]
    if not store.promote_policy(previous.version, expected=current.version):
        raise PromotionRefused(f"the promoted version changed while rolling back from {current.version}: try again")
    store.set_policy_status(current.version, "rejected", {"rolled_back_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return {"promoted": previous.version, "previous": current.version}
