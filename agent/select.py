"""Which searched trajectories become training data.

Verifier mode: verified-correct candidates, the most confident one per problem.
Label-free mode (answers never used): a pipeline of filters over each problem's group of candidates, as in
Lee et al. 2025: format/length -> vote share -> the task's own consistency checks -> confidence, then the
task's label proposals (decompositions the policy solves) for the problems the filters dropped. Every stage
reports the fraction of problems kept so far and, when ground truth exists, the precision of what survives it
(ground truth is read only for that report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from agent.config import SelectConfig
from agent.proposals import ProposedLabels, mastered_up_to, memoized, proposals_in_use
from search import Candidate, SearchResult, traits_of
from tasks import Solve, Task, verify


@dataclass
class Pseudo:
    """A problem's pseudo-label as it passes through the filters."""

    result: SearchResult
    answer: str | None = None  # the label the filters vote for
    completion: str | None = None  # the candidate text to train on
    share: float = 0.0
    confidence: float = float("-inf")
    # (answer, completion, share, confidence) of every answer still in the running, most supported first: the
    # task's checks pick the first that passes them (SelectConfig.checked_min_share); empty means `answer` alone
    contenders: list[tuple[str, str, float, float]] = field(default_factory=list)

    def choose(self, contender: tuple[str, str, float, float]) -> None:
        self.answer, self.completion, self.share, self.confidence = contender


@dataclass
class Selection:
    examples: list[dict]  # {"prompt", "completion", "problem_id"}
    filters: list[dict] = field(default_factory=list)  # name, kept, kept_fraction, precision
    mode: str = "label_free"  # the rule that accepted the labels; preference pairs judge the siblings by it
    given: int = 0  # examples that are a problem's own given answer (the search found none that verified)


def _precision(items: list[Pseudo], task: Task) -> float | None:
    judged = [p for p in items if p.result.problem.answer is not None]
    if not judged:
        return None
    # before the vote, a problem's label is its best-ranked candidate
    labels = [p.completion if p.completion is not None else p.result.best.completion for p in judged]
    return sum(bool(verify(p.result.problem, text)) for p, text in zip(judged, labels)) / len(judged)


def answer_support(result: SearchResult, task: Task) -> dict[str, float]:
    """Each well-formed answer's share of the candidates. Samples (best-of-N, with repeats) are counted: the
    count is the Monte Carlo estimate of the answer's probability. A tree strategy's candidates are weighed by
    their sequence probability under the policy instead, each completion once, normalised over them: a count
    would give every answer 1/k, and diverse beam's groups can return the same completion more than once."""
    candidates = result.candidates
    if not traits_of(result.strategy).samples and len(candidates) > 1:
        candidates = list(
            {c.completion: c for c in reversed(candidates)}.values()
        )  # each completion once (its best-ranked copy)
        logps = [sum(c.logprobs) if c.logprobs else c.mean_logprob * max(1, len(c.token_ids)) for c in candidates]
        top = max(logps)
        weights = [math.exp(lp - top) for lp in logps]
    else:
        weights = [1.0] * len(candidates)
    answers = [task.extract(result.problem, c.completion) for c in candidates]
    total = sum(weights)
    support: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            support[answer] = support.get(answer, 0.0) + weight / total
    return support


class VoteShare:
    """The answer with the most support (see answer_support) is the label when its share reaches min_share.
    With `contender_share`, every answer with at least that support stays a contender for the checks that follow
    (most supported first), and a problem is kept when it has any."""

    name = "vote_share"

    def __init__(self, min_share: float, contender_share: float | None = None):
        self.min_share, self.contender_share = min_share, contender_share

    def __call__(self, items: list[Pseudo], task: Task, solve: Solve) -> list[Pseudo]:
        kept = []
        for p in items:
            support = answer_support(p.result, task)
            ranked = sorted(support, key=support.get, reverse=True)
            bar = self.min_share if self.contender_share is None else self.contender_share
            contenders = [self._contender(p.result, task, a, support[a]) for a in ranked if support[a] >= bar]
            if not contenders:
                continue
            if self.contender_share is not None:
                p.contenders = contenders
            p.choose(contenders[0])
            kept.append(p)
        return kept

    @staticmethod
    def _contender(result: SearchResult, task: Task, answer: str, share: float) -> tuple[str, str, float, float]:
        best = most_confident_with(result, task, answer)
        return answer, best.completion, share, best.mean_logprob


def most_confident_with(result: SearchResult, task: Task, answer: str) -> Candidate:
    """The candidate stating `answer` whose mean token log-prob is highest."""
    return max((c for c in result.candidates if task.extract(result.problem, c.completion) == answer),
               key=lambda c: c.mean_logprob)


class FormatCheck:
    """At least one candidate is well formed (the task's own parser accepts it)."""

    name = "format"

    def __call__(self, items, task, solve):
        return [
            p
            for p in items
            if any(task.extract(p.result.problem, c.completion) is not None for c in p.result.candidates)
        ]


class ConfidenceFloor:
    """The chosen candidate's mean token log-prob is at least `floor`."""

    def __init__(self, floor: float, name: str = "confidence"):
        self.floor, self.name = floor, name

    def __call__(self, items, task, solve):
        return [p for p in items if p.confidence >= self.floor]


class ContenderCheck:
    """A filter stage that judges every contender of every problem in one batch (`verdicts`); those that fail drop
    out, and the label is the best supported survivor."""

    name = "check"

    def verdicts(self, pending: list[tuple[Pseudo, tuple[str, str, float, float]]], solve: Solve) -> list[bool]:
        raise NotImplementedError

    def __call__(self, items: list[Pseudo], task: Task, solve: Solve) -> list[Pseudo]:
        if not items:
            return []
        pending = [(p, c) for p in items for c in (p.contenders or [(p.answer, p.completion, p.share, p.confidence)])]
        passed = self.verdicts(pending, solve)
        if len(passed) != len(pending):
            raise RuntimeError(f"label check {self.name!r} returned {len(passed)} verdicts for {len(pending)} answers")
        survivors: dict[int, list] = {}
        for (p, contender), ok in zip(pending, passed):
            if ok:
                survivors.setdefault(id(p), []).append(contender)
        kept = []
        for p in items:
            if id(p) in survivors:
                p.contenders = survivors[id(p)] if p.contenders else []
                p.choose(survivors[id(p)][0])
                kept.append(p)
        return kept


class TaskCheck(ContenderCheck):
    """One of the task's own label checks (tasks/: invariances, decompositions) on each contender's answer."""

    def __init__(self, name: str, check):
        self.name, self.check = name, check

    def verdicts(self, pending, solve):
        return self.check([p.result.problem for p, _ in pending], [c[0] for _, c in pending], solve)


class ValueFloor(ContenderCheck):
    """The value model's probability that a contender's completion is right is at least `floor`."""

    name = "value"

    def __init__(self, value_model, floor: float):
        self.value_model, self.floor = value_model, floor

    def verdicts(self, pending, solve):
        values = self.value_model.score([p.result.problem.prompt for p, _ in pending], [c[1] for _, c in pending])
        return [v[-1] >= self.floor for v in values]


def task_filters(task: Task, checks: dict | None = None) -> list[TaskCheck]:
    return [TaskCheck(name, check) for name, check in (task.label_checks() if checks is None else checks).items()]


def calibrated_floor(mastered_confidences: list[float], quantile: float | None) -> float | None:
    """The `quantile` of the policy's confidence on greedy answers at difficulties it has mastered (at least 90%
    right there, so this is about the confidence of right answers), or None without any."""
    if quantile is None or not mastered_confidences:
        return None
    ordered = sorted(mastered_confidences)
    return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


def select(results: list[SearchResult], task: Task, cfg: SelectConfig, solve: Solve,
           mastered_confidences: list[float] | None = None, gate_metric: dict | None = None,
           value_model=None) -> Selection:
    """`mastered_confidences`: the current policy's greedy confidences on held-out problems of mastered difficulties,
    which calibrate the confidence filter of tasks without label checks (SelectConfig.calibration_quantile).
    `gate_metric`: the current policy's, from its latest evaluation only: label proposals trust its answers up to the
    first difficulty below cfg.proposal_mastery (None: trusted nowhere if cfg.verify_proposal_parts, else anywhere).
    `value_model`: the current version's, which cfg.min_value filters by (None: that filter is off)."""
    if cfg.mode == "verifier":
        return _select_verified(results, cfg.given_answers)
    items = [Pseudo(r) for r in results]
    # contenders are worth keeping only for a stage that judges each of them: the task's checks or the value model
    judged = ((cfg.use_task_filters and bool(task.label_checks()))
              or (cfg.min_value is not None and value_model is not None))
    filters = [FormatCheck(), VoteShare(cfg.min_vote_share, cfg.checked_min_share if judged else None)]
    if cfg.use_task_filters:
        filters += task_filters(task)
    # a problem's contenders share its sub-problems (the split check's halves), and so do the proposals
    solve = memoized(solve)
    floor = calibrated_floor(mastered_confidences or [], cfg.calibration_quantile)
    if not task.label_checks() and floor is not None:
        # no check of the task's own: vote share alone keeps the policy's unanimous mistakes (measured on files whose
        # problems carried answers: 91% kept, about the greedy accuracy); a label must also be as confident as
        # answers the policy gets right
        filters.append(ConfidenceFloor(floor, "calibrated_confidence"))
    if cfg.min_confidence is not None:
        filters.append(ConfidenceFloor(cfg.min_confidence))
    if cfg.min_value is not None and value_model is not None:
        filters.append(ValueFloor(value_model, cfg.min_value))
    report = []
    everything, total = list(items), len(items)
    for f in filters:
        items = f(items, task, solve)
        report.append(
            {
                "name": f.name,
                "kept": len(items),
                "kept_fraction": len(items) / total if total else 0.0,
                "precision": _precision(items, task),
                **({"floor": f.floor} if isinstance(f, (ConfidenceFloor, ValueFloor)) else {}),
            }
        )
    if proposals_in_use(task, cfg):
        proposals = ProposedLabels(task.label_proposals())
        kept_ids = {id(p) for p in items}
        trusted = (None if gate_metric is None or cfg.proposal_mastery is None
                   else mastered_up_to(gate_metric, cfg.proposal_mastery))
        added = proposals([p for p in everything if id(p) not in kept_ids], task, solve, trusted,
                          cfg.verify_proposal_parts)
        items = items + added
        report.append(
            {
                "name": proposals.name,
                "kept": len(items),
                "kept_fraction": len(items) / total if total else 0.0,
                "precision": _precision(items, task),
                "added": len(added),
                "added_precision": _precision(added, task),
                # the longest length whose answers may write labels (null: none is mastered)
                **({} if trusted is None else {"trusted_up_to": trusted if math.isfinite(trusted) else None}),
            }
        )
    examples = [
        {"prompt": p.result.problem.prompt, "completion": p.completion, "problem_id": p.result.problem.id}
        for p in items
    ]
    return Selection(examples, report)


def _select_verified(results: list[SearchResult], given_answers: bool) -> Selection:
    """The most confident verified candidate per problem; where none verified, the problem's own answer when it
    is a completion (exact checker; a numeric or regex answer is a test, not a text to write): the policy then
    learns the problems it cannot solve yet, not only those it already can."""
    examples, given = [], 0
    for r in results:
        correct = [c for c in r.candidates if c.verified]
        if correct:
            best = max(correct, key=lambda c: c.mean_logprob)
            examples.append({"prompt": r.problem.prompt, "completion": best.completion, "problem_id": r.problem.id})
        elif given_answers and r.problem.answer is not None and r.problem.checker == "exact":
            examples.append({"prompt": r.problem.prompt, "completion": r.problem.answer, "problem_id": r.problem.id})
            given += 1
    total = len(results)
    searched = len(examples) - given
    report = [{"name": "verifier", "kept": searched, "kept_fraction": searched / total if total else 0.0,
               "precision": 1.0 if searched else None}]
    if given_answers:
        report.append(
            {
                "name": "given_answer",
                "kept": len(examples),
                "kept_fraction": len(examples) / total if total else 0.0,
                "precision": 1.0 if examples else None,
            }
        )
    return Selection(examples, report, mode="verifier", given=given)
