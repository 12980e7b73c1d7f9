"""Preference pairs from one cycle's search: the label a problem was accepted with against a sibling that got it wrong.

A search already produces the negatives DPO needs: the candidates of an accepted problem whose answer differs from
the accepted one. The most confident of them is the mistake the policy is most likely to make, so it is the one
pushed down. Label-free selections judge siblings by their extracted answer only (no ground truth); verifier
selections by the checker's verdict.
"""

from __future__ import annotations

from search import Candidate, SearchResult
from agent.select import Selection
from tasks import Task


def _wrong(result: SearchResult, example: dict, task: Task, mode: str) -> list[Candidate]:
    """Siblings that disagree with the accepted label (malformed ones included)."""
    if mode == "verifier":
        return [c for c in result.candidates if c.verified is False]
    answer = task.extract(result.problem, example["completion"])
    if answer is None:  # nothing to disagree with
        return []
    return [c for c in result.candidates if task.extract(result.problem, c.completion) != answer]


def preference_pairs(
    results: list[SearchResult], selection: Selection, task: Task, max_pairs: int | None = None
) -> list[dict]:
    """{"prompt", "chosen", "rejected", "problem_id"} per accepted problem that has a wrong sibling; at most
    `max_pairs`, keeping the most confident mistakes."""
    accepted = {e["problem_id"]: e for e in selection.examples}
    pairs, confidence = [], []
    for r in results:
        example = accepted.get(r.problem.id)
        if example is None:
            continue
        wrong = [c for c in _wrong(r, example, task, selection.mode) if c.completion != example["completion"]]
        if not wrong:
            continue
        rejected = max(wrong, key=lambda c: c.mean_logprob)
        pairs.append({"prompt": r.problem.prompt, "chosen": example["completion"], "rejected": rejected.completion,
                      "problem_id": r.problem.id})
        confidence.append(rejected.mean_logprob)
    if max_pairs is not None and len(pairs) > max_pairs:
        order = sorted(range(len(pairs)), key=lambda i: -confidence[i])[:max_pairs]
        pairs = [pairs[i] for i in sorted(order)]  # the kept pairs in search order
    return pairs
