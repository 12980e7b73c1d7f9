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
    value          the policy version's value model: P(right answer | prompt + completion so far), in [0, 1], for
                   a partial completion as for a finished one (agent/value.py); needs a policy that carries one
                   (`policy.value_model`), else a one-line refusal
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


class Value(Scorer):
    """The value model's estimate for each candidate: partial ones too (step beam's steps, MCTS's nodes). Values
    are remembered per search, so that ranking the finished candidates at the end costs no second forward."""

    name = "value"

    def __init__(self, value_model=None, version: str | None = None):
        self.value_model, self.version = value_model, version
        self._seen: dict[tuple, float] = {}

    def score(self, problems, candidates):
        if self.value_model is None:
            raise ValueError(value_refusal(self.version))
        todo = {}
        for problem, cs in zip(problems, candidates):
            for c in cs:
                key = (problem.prompt, tuple(c.token_ids), c.finished)
                if key not in self._seen:
                    todo[key] = c
        if todo:
            keys = list(todo)
            values = self.value_model.score([k[0] for k in keys], [list(k[1]) for k in keys], [k[2] for k in keys])
            self._seen.update((k, v[-1]) for k, v in zip(keys, values))
        return [[self._seen[(p.prompt, tuple(c.token_ids), c.finished)] for c in cs] for p, cs in zip(problems, candidates)]


def value_refusal(version: str | None) -> str:
    return (f"scorer 'value' needs a value model, and policy version {version or '(unversioned)'} has none: train "
            "one (agent.value.train_value) and save it beside the version, or choose another scorer")


class Sum(Scorer):
    def __init__(self, parts: list[Scorer]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.penalise_unfinished = any(p.penalise_unfinished for p in parts if not isinstance(p, Verifier))

    def score(self, problems, candidates):
        tables = [p.score(problems, candidates) for p in self.parts]
        return [[sum(t[i][j] for t in tables) for j in range(len(cs))] for i, cs in enumerate(candidates)]


SCORERS = ("mean_logprob", "min_logprob", "neg_entropy", "beam_score", "verifier", "value")


def load_scorer(spec: str, use_verifier: bool, length_penalty: float, policy=None) -> Scorer:
    """The scorer `spec` names; "verifier" only when the run may use answers (`use_verifier`); "value" only with a
    `policy` that carries a value model (without a policy, as when a configuration is checked, it is only named)."""
    parts = []
    for name in spec.split("+"):
        if name == "value":
            value_model = getattr(policy, "value_model", None)
            if policy is not None and value_model is None:
                raise ValueError(value_refusal(getattr(policy, "version", None)))
            parts.append(Value(value_model, getattr(policy, "version", None)))
        elif name == "verifier":
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
    return rank_all(scorer, [problem], [candidates])[0]


def rank_all(scorer: Scorer, problems: list[Problem], candidates: list[list[Candidate]]) -> list[list[Candidate]]:
    """rank_by for many problems in one call of the scorer (a value model scores them in batched forwards)."""
    tables = scorer.score(problems, candidates)
    ranked = []
    for cs, scores in zip(candidates, tables):
        for c, s in zip(cs, scores):
            c.score = s if (c.finished or not scorer.penalise_unfinished) else s - 1e6
        ranked.append(sorted(cs, key=lambda c: c.score, reverse=True))
    return ranked

