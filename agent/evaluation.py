"""Held-out evaluation of a policy: ground-truth accuracy, the self-verified rate (the task's label checks on its
greedy answers, no ground truth) and the confidence of each answer, per difficulty key; and the gate metric, the
one number per key that promotion and the curriculum look at."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from agent.select import Pseudo, task_filters
from search import SearchConfig, run_search
from tasks import Problem, Task


def greedy_config(max_new_tokens: int = 64, max_rows: int = 2048) -> SearchConfig:
    """The greedy search of evaluations and of the label checks' sub-problems."""
    return SearchConfig(strategy="greedy", max_new_tokens=max_new_tokens, max_rows=max_rows)


def greedy_solver(policy, cfg: SearchConfig) -> Callable[[list[Problem]], list[str]]:
    """The label filters' access to the policy: greedy answers to sub-problems, batched, at `cfg`'s lengths."""
    greedy = greedy_config(cfg.max_new_tokens, cfg.max_rows)

    def solve(problems: list[Problem]) -> list[str]:
        return [r.best.completion for r in run_search(problems, greedy, policy)]

    return solve


@dataclass(frozen=True)
class Evaluation:
    """One policy's held-out evaluation, per key (a difficulty, or "all"). `mode` is the selection mode the gate
    judges by: label-free with label checks, the self-verified rate; otherwise ground-truth accuracy (`metric`)."""

    mode: str
    accuracy: dict[str, float] = field(default_factory=dict)
    self_verified: dict[str, float] = field(default_factory=dict)
    # the mean token log-prob of each greedy answer: what calibrates label-free selection for tasks without checks
    confidence: dict[str, list[float]] = field(default_factory=dict)
    generated_tokens: int = 0
    # each problem's greedy answer (problem id -> Candidate), for reuse in the same cycle; never stored
    answers: dict = field(default_factory=dict, compare=False, repr=False)
    metric: dict[str, float] = field(init=False, compare=False)

    def __post_init__(self):
        chosen = self.self_verified if self.mode == "label_free" and self.self_verified else self.accuracy
        object.__setattr__(self, "metric", chosen)

    def score(self, keys: list[str]) -> float:
        """The gate score: the metric's mean over those of `keys` it has (0 when none)."""
        common = [k for k in keys if k in self.metric]
        return sum(self.metric[k] for k in common) / len(common) if common else 0.0

    def merged(self, other: Evaluation) -> Evaluation:
        """This evaluation with `other`'s keys added (the same policy, evaluated at more keys)."""
        return Evaluation(self.mode, {**self.accuracy, **other.accuracy}, {**self.self_verified, **other.self_verified},
                          {**self.confidence, **other.confidence}, self.generated_tokens + other.generated_tokens,
                          {**self.answers, **other.answers})

    def stored(self) -> dict:
        """The form a run's store keeps (and `Evaluation(**stored)` rebuilds): everything but the derived metric."""
        return {"mode": self.mode, "accuracy": self.accuracy, "self_verified": self.self_verified,
                "confidence": self.confidence, "generated_tokens": self.generated_tokens}


def evaluate_policy(policy, by_key: dict[str, list[Problem]], cfg: SearchConfig, task: Task | None = None,
                    verify_keys: list[str] | None = None, mode: str = "verifier") -> Evaluation:
    """Search every held-out problem with `cfg`; accuracy per key where problems carry answers and, when the task
    declares label checks, the self-verified rate for `verify_keys` (default: every key; keys shown only in reports
    need none)."""
    problems = [p for ps in by_key.values() for p in ps]
    key_of = {p.id: key for key, ps in by_key.items() for p in ps}
    results = run_search(problems, cfg, policy) if problems else []
    by_result_key: dict[str, list] = {}
    for r in results:
        by_result_key.setdefault(key_of[r.problem.id], []).append(r)
    accuracy = {}
    for key, rs in by_result_key.items():
        judged = [r for r in rs if r.best.verified is not None]
        if judged:
            accuracy[key] = sum(bool(r.best.verified) for r in judged) / len(judged)
    self_verified = {}
    if task is not None and task.self_verification_checks():
        wanted = lambda key: verify_keys is None or key in verify_keys  # noqa: E731
        items = []
        for r in results:
            answer = task.extract(r.problem, r.best.completion)
            if answer is not None and wanted(key_of[r.problem.id]):
                items.append(Pseudo(r, answer=answer, completion=r.best.completion))
        solve = greedy_solver(policy, cfg)
        for f in task_filters(task, task.self_verification_checks()):
            items = f(items, task, solve)
        passed: dict[str, int] = {}
        for p in items:
            key = key_of[p.result.problem.id]
            passed[key] = passed.get(key, 0) + 1
        self_verified = {key: passed.get(key, 0) / len(rs) for key, rs in by_result_key.items() if wanted(key)}
    confidence = {key: [r.best.mean_logprob for r in rs] for key, rs in by_result_key.items()}
    return Evaluation(mode, accuracy, self_verified, confidence, sum(r.generated_tokens for r in results),
                      {r.problem.id: r.best for r in results})
