"""Scorers: how tree strategies value a (partial or finished) completion. Higher is better.

`Scorer.score(problems, candidates) -> list[list[float]]` sees the problem and the candidate (text, token ids,
per-token log-probs, summaries), so a reward model can implement it later; `load_scorer(spec)` builds one from
a name, or names joined by "+" (a sum), e.g. "verifier+mean_logprob" (SearchConfig.build_scorer: the run's).

    mean_logprob   length-normalised log-prob of the path
    min_logprob    its least likely token (one bad digit sinks an answer)
    neg_entropy    minus the mean entropy of the policy along the path
    beam_score     sum logprob / length**length_penalty, the score `generate` ranks beams by (the default for
                   beam and diverse beam, so that beam still equals `generate`)
    verifier       1 for a finished answer the checker accepts, else 0 (used only when cfg.use_verifier)
"""

from __future__ import annotations

from tasks import Problem
from search.types import Candidate


class Scorer:
    name = "scorer"
    penalise_unfinished = True  # rank_by puts completions that never reached EOS below finished ones

    def score(self, problems: list[Problem], candidates: list[list[Candidate]]) -> list[list[float]]:
        raise NotImplementedError


class Confidence(Scorer):
    KINDS = ("mean_logprob", "min_logprob", "neg_entropy")

    def __init__(self, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"unknown confidence {kind!r}: use one of {', '.join(self.KINDS)}")
        self.name = kind

    def score(self, problems, candidates):
        if self.name == "neg_entropy":
            return [[-c.mean_entropy for c in cs] for cs in candidates]
        return [[getattr(c, self.name) for c in cs] for cs in candidates]


class BeamScore(Scorer):
    """The beam score; like `generate`, it ranks a hypothesis cut at the length cap by its score alone."""

    name = "beam_score"
    penalise_unfinished = False

    def __init__(self, length_penalty: float):
        self.length_penalty = length_penalty

    def score(self, problems, candidates):
        return [[c.beam_score if c.beam_score is not None else self._of(c) for c in cs] for cs in candidates]

    def _of(self, c: Candidate) -> float:
        n = max(1, len(c.logprobs))
        return sum(c.logprobs) / n**self.length_penalty


class Verifier(Scorer):
    name = "verifier"

    def score(self, problems, candidates):
        return [[1.0 if (c.finished and c.verified) else 0.0 for c in cs] for cs in candidates]


class Sum(Scorer):
    def __init__(self, parts: list[Scorer]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.penalise_unfinished = any(p.penalise_unfinished for p in parts if not isinstance(p, Verifier))

    def score(self, problems, candidates):
        tables = [p.score(problems, candidates) for p in self.parts]
        return [[sum(t[i][j] for t in tables) for j in range(len(cs))] for i, cs in enumerate(candidates)]


SCORERS = ("mean_logprob", "min_logprob", "neg_entropy", "beam_score", "verifier")


def load_scorer(spec: str, use_verifier: bool, length_penalty: float) -> Scorer:
    """The scorer `spec` names; "verifier" only when the run may use answers (`use_verifier`)."""
    parts = []
    for name in spec.split("+"):
        if name == "verifier":
            if not use_verifier:
                raise ValueError("scorer 'verifier' needs use_verifier=True (the run must be allowed to use answers)")
            parts.append(Verifier())
        elif name == "beam_score":
            parts.append(BeamScore(length_penalty))
        elif name in Confidence.KINDS:
            parts.append(Confidence(name))
        else:
            raise ValueError(f"unknown scorer {name!r} in {spec!r}: use names from {', '.join(SCORERS)} joined by '+'")
    return parts[0] if len(parts) == 1 else Sum(parts)


def rank_by(scorer: Scorer, problem: Problem, candidates: list[Candidate]) -> list[Candidate]:
    """Set each candidate's score and sort best first; an unfinished completion never beats a finished one."""
    scores = scorer.score([problem], [candidates])[0]
    for c, s in zip(candidates, scores):
        c.score = s if (c.finished or not scorer.penalise_unfinished) else s - 1e6
    return sorted(candidates, key=lambda c: c.score, reverse=True)

