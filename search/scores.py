"""Confidence scores from the policy's own token log-probs, and how candidates are ranked."""

from __future__ import annotations

import math

from search.types import Candidate, SearchConfig


def confidence(logprobs: list[float], entropies: list[float]) -> dict[str, float]:
    """Length-normalised log-prob, minimum log-prob and mean entropy of one completion."""
    if not logprobs:
        return {"mean_logprob": 0.0, "min_logprob": 0.0, "mean_entropy": 0.0}
    return {
        "mean_logprob": sum(logprobs) / len(logprobs),
        "min_logprob": min(logprobs),
        "mean_entropy": sum(entropies) / len(entropies),
    }


def rank(candidates: list[Candidate], cfg: SearchConfig) -> list[Candidate]:
    """Score and sort best first: verified answers first when the verifier may be used, then confidence."""
    for c in candidates:
        conf = c.mean_logprob if cfg.confidence == "mean_logprob" else c.min_logprob
        bonus = 1.0 if (cfg.use_verifier and c.verified) else 0.0
        c.score = bonus + (conf if c.finished else -math.inf)
    return sorted(candidates, key=lambda c: c.score, reverse=True)
