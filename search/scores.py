"""Confidence summaries of a completion from the policy's own token log-probs (ranking: search/scorers.py)."""

from __future__ import annotations


def confidence(logprobs: list[float], entropies: list[float]) -> dict[str, float]:
    """Length-normalised log-prob, minimum log-prob and mean entropy of one completion."""
    if not logprobs:
        return {"mean_logprob": 0.0, "min_logprob": 0.0, "mean_entropy": 0.0}
    return {
        "mean_logprob": sum(logprobs) / len(logprobs),
        "min_logprob": min(logprobs),
        "mean_entropy": sum(entropies) / len(entropies),
    }
