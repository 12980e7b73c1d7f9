"""Train a candidate and judge it against the current policy, by the one promotion rule (agent/promotion.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from agent import distributed
from agent.adapters import resolved_adapter
from agent.config import PreferenceConfig, TrainConfig
from agent.evaluation import Evaluation, evaluate_policy
from agent.policy import Policy
from agent.promotion import beats
from agent.trainer import DPOFineTuner, SFTFineTuner, clone_for_training
from search import SearchConfig
from search.prompt_format import formatted_examples
from tasks import Problem, Task


def train_candidate(current: Policy, examples: list[dict], pairs: list[dict], train: TrainConfig, method: str,
                    preference: PreferenceConfig, start=None) -> tuple[object, dict]:
    """A fine-tuned copy of `current`'s model and the fine-tune's stats: SFT on `examples`, DPO on `pairs`
    (agent/preference.py), or DPO after SFT (method sft+dpo; with no pairs, SFT gets DPO's time so that a cycle costs
    the same). The copy leaves `current` untouched: a rejected candidate costs nothing but its time. With LoRA
    (FineTuneConfig.adapter) the candidate is an adapter over `current`'s frozen base weights. `start`: the model to
    fine-tune a copy of instead of `current`'s (a rejected candidate of `current` whose training goes on)."""
    train = replace(train, adapter=resolved_adapter(train.adapter, current.model))
    preference = replace(preference, adapter=resolved_adapter(preference.adapter, current.model))
    model = clone_for_training(current.model if start is None else start,
                               (preference if method == "dpo" else train).adapter)
    # the candidate reads prompts as its version does in search and evaluation
    examples = formatted_examples(examples, current.prompt_format, current.tokenizer)
    pairs = formatted_examples(pairs, current.prompt_format, current.tokenizer)
    stats: dict = {}
    if method == "sft+dpo" and not pairs:
        train = replace(train, time_budget_s=train.time_budget_s + preference.time_budget_s)
    if method in ("sft", "sft+dpo"):
        distributed.share_fine_tune(current.version, examples, train)  # other ranks of a multi-process launch join it
        sft = SFTFineTuner(train)
        stats = sft.train(model, current.tokenizer, examples)
        model = sft.trained
    if method in ("dpo", "sft+dpo"):
        dpo = {"steps": 0, "seconds": 0.0}
        if pairs:
            tuner = DPOFineTuner(preference)
            dpo = tuner.train(model, current.tokenizer, pairs)
            model = tuner.trained
        stats["dpo"] = {**dpo, "pairs": len(pairs)}
    stats["adapter"] = (preference if method == "dpo" else train).adapter
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

    def fell(self) -> dict[str, dict[str, float]]:
        """The keys where the candidate scores below the current policy: the gate metric before (current) and after
        (candidate), what a rejection is explained by."""
        before, after = self.current.metric, self.candidate.metric
        return {k: {"before": before[k], "after": after[k]} for k in self.keys
                if k in before and k in after and after[k] < before[k]}

    def metrics(self) -> dict:
        """What the candidate's version records."""
        return {"heldout": self.candidate.accuracy, "self_verified": self.candidate.self_verified,
                "gate_score": self.candidate_score, "current_gate_score": self.current_score, "gate_keys": self.keys}


def judge(
    candidate: Policy,
    current: Policy,
    heldout: dict[str, list[Problem]],
    search: SearchConfig,
    task: Task | None,
    mode: str,
    margin: float,
    keys: list[str] | None = None,
    current_eval: Evaluation | None = None,
    current_sample: int | None = None,
) -> Verdict:
    """Evaluate the candidate and compare gate scores over `keys` (default: every held-out key). `current_eval` is what
    the current policy already scored (the loop keeps it between cycles): it is evaluated only at the keys missing,
    on the first `current_sample` of their problems where set (an unbiased score per key, for a fraction of the
    decoding: the candidate is always scored on all of them)."""
    t = time.monotonic()
    cand = evaluate_policy(candidate, heldout, search, task, keys, mode)
    keys = [k for k in (keys if keys is not None else sorted(heldout)) if k in cand.metric]
    cur = current_eval if current_eval is not None else Evaluation(mode)
    missing = {k: heldout[k][:current_sample] for k in keys if k not in cur.metric}
    if missing:
        cur = cur.merged(evaluate_policy(current, missing, search, task, keys, mode))
    cand_score, cur_score = cand.score(keys), cur.score(keys)
    return Verdict(beats(cand_score, cur_score, margin), cand, cur, cand_score, cur_score, keys, time.monotonic() - t)


def gate_keeps_rejecting(records: list, limit: int, mode: str, continuing: bool = False) -> str | None:
    """Why a run should end, when the candidates of its last `limit` cycle records (agent/loop.py CycleRecord) all
    failed the gate against the same policy: a next cycle would only repeat them. `continuing`: each rejected
    candidate's fine-tune went on in the next cycle, which ends only when the last `limit` of them scored no higher
    at the gate than the best before them. Names the lengths that fell in each."""
    from agent.report import NONE_FELL, fell_text  # the report's plotting imports only once a run needs them

    streak: list = []
    for r in reversed(records):
        if r.candidate is None or r.promoted or r.stale:
            break
        streak.insert(0, r)
    if not limit or len(streak) < limit:
        return None
    last = streak[-limit:]
    if continuing:
        before = [r.gate.get("candidate", float("-inf")) for r in streak[:-limit]]
        if max(r.gate.get("candidate", float("-inf")) for r in last) > max(before, default=float("-inf")):
            return None
    fell = "; ".join(f"cycle {r.cycle}: {fell_text(r.gate, most=4) or NONE_FELL}" for r in last)
    advice = ("give the problems answers, or use a task with label checks" if mode == "label_free"
              else "give the fine-tune more time (--train-seconds) or more problems at the lengths that fell")
    return (f"stopped: the gate rejected {limit} candidates in a row trained from {last[-1].policy_version} ({fell}); "
            f"this cycle would repeat them: {advice}")
