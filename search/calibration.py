"""How well a score tells right answers from wrong ones, and the threshold adaptive search (search/adaptive.py)
keeps a greedy answer above: calibrated on held-out problems with answers and stored with the value model."""

from __future__ import annotations

from search.config import SearchConfig
from search.prompt_format import formatted_problems
from search.strategies import run_search


def calibrate(value_model, policy, problems: list, precision: float = 0.95, max_new_tokens: int = 64) -> dict:
    """Set the value model's accept threshold for adaptive search (search/adaptive.py) from `problems` with answers
    (held-out ones): the policy's greedy answers are scored by the model and checked, and the threshold is the
    lowest value at which the answers scoring at least that are right at `precision`. Returns what it measured
    (also kept in the model's meta, so saved with it); no threshold reaches `precision`: accept_score stays unset."""
    answered = [p for p in problems if p.answer is not None]
    if not answered:
        raise ValueError("calibration needs problems with answers (held-out ones)")
    results = run_search(answered, SearchConfig(strategy="greedy", max_new_tokens=max_new_tokens), policy)
    best = [r.best for r in results]
    shown = formatted_problems(answered, policy.prompt_format, policy.tokenizer)  # as the value scorer sees them
    values = [v[-1] for v in value_model.score([p.prompt for p in shown], [c.token_ids for c in best],
                                               [c.finished for c in best])]
    right = [bool(c.verified) for c in best]
    threshold = calibrate_accept_score(values, right, precision)
    kept = sum(v >= threshold for v in values) if threshold is not None else 0
    report = {"accept_score": threshold, "precision": precision, "problems": len(answered),
              "greedy_accuracy": round(sum(right) / len(right), 4), "kept_share": round(kept / len(right), 4),
              "auroc": auroc(values, right)}
    value_model.meta.update(accept_score=threshold, calibration=report)
    return report


def calibrate_accept_score(scores: list[float], right: list[bool], precision: float = 0.95) -> float | None:
    """The lowest threshold at which the greedy answers scoring at least it are right at `precision` or better (on
    held-out problems with answers): above it a greedy answer is kept, below it the search escalates. None when no
    threshold reaches that precision."""
    if len(scores) != len(right) or not scores:
        raise ValueError("calibration needs one verdict per score, and at least one")
    pairs = sorted(zip(scores, right), key=lambda p: -p[0])
    best, hits = None, 0
    for n, (score, ok) in enumerate(pairs, 1):
        hits += ok
        last_of_tie = n == len(pairs) or pairs[n][0] != score
        if last_of_tie and hits / n >= precision:
            best = score
    return best


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random right item scores above a random wrong one (ties
    count half). None without both kinds."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return None
    ranked = sorted((s, i) for i, s in enumerate(scores))
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, l in zip(ranks, labels) if l)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
