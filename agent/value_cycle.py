"""A cycle's value model: labelled candidates from the cycle's search, a value model trained on them (continuing
the current version's), calibrated for adaptive search, saved beside the candidate version and promoted with it.

Labels are the ones the cycle's own selection trusts: in verifier mode the checker's verdict on every finished
candidate; label-free, agreement with the answer the filters accepted for the problem (problems the filters
dropped give no labels). Answers of train problems are never read label-free. A label-free run of a task without
label checks trusts nothing its own selection accepts (vote share keeps the policy's unanimous mistakes), so its
value model learns RankGen-style from the demonstrations instead (`demonstration_candidates`). The calibration
reads the held-out problems' answers, as the run's report does; it sets only the threshold queue jobs escalate
at, never a label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.config import LoopConfig
from agent.policy import Policy
from search import SearchResult
from search.calibration import calibrate
from tasks import Problem, Task

CALIBRATION_PROBLEMS = 300  # held-out problems scored for the threshold: a few seconds of greedy decoding


def labelled_candidates(results: list[SearchResult], examples: list[dict], task: Task, mode: str) -> list[dict]:
    """[{"prompt", "completion", "label"}] for the finished candidates the cycle's selection can judge."""
    accepted = {e["problem_id"]: e["completion"] for e in examples}
    rows = []
    for r in results:
        if mode == "verifier":
            judged = [(c, bool(c.verified)) for c in r.candidates if c.finished and c.verified is not None]
        elif r.problem.id in accepted:
            label = task.extract(r.problem, accepted[r.problem.id])
            judged = [(c, task.extract(r.problem, c.completion) == label) for c in r.candidates if c.finished]
        else:
            judged = []
        rows += [{"prompt": r.problem.prompt, "completion": c.completion, "label": ok} for c, ok in judged]
    return rows


def learns_from_demonstrations(task: Task, cfg: LoopConfig) -> bool:
    """Whether the run's value model learns from the demonstrations rather than from the cycle's own labels."""
    return cfg.select.mode == "label_free" and not task.label_checks()


def demonstration_candidates(policy: Policy, demos: list[dict], task: Task, cfg: LoopConfig, seed: int) -> list[dict]:
    """RankGen's data for a judge: demonstrations as right completions against the policy's own different answers
    to the same prompts as wrong ones, for cfg.value_demonstrations prompts: cfg.search's samples, and
    cfg.value_branches answers that leave the demonstration where the policy is least sure of it (its runner-up
    token there, then greedy, as search/repair.py repairs). A policy that has learned its demonstrations samples
    them back (measured: 0 of 1,024 samples wrong on mirror letters after the warm start), so the branches are the
    negatives that remain: its likeliest mistakes. Any answer that states the demonstration's answer is right."""
    from search import SearchConfig, run_search
    from search.repair import branch_points, repair
    from search.types import Candidate

    rng = random.Random(seed)
    chosen = rng.sample(demos, min(len(demos), cfg.value_demonstrations))
    if not chosen:
        return []
    problems = [Problem(prompt=d["prompt"], id=f"demonstration-{i}") for i, d in enumerate(chosen)]
    encoded = [policy.tokenizer(d["completion"], add_special_tokens=False).input_ids for d in chosen]
    room = 2 * max(len(ids) for ids in encoded) + 2
    sampling = SearchConfig(strategy="best_of_n", n=cfg.search.n, temperature=cfg.search.temperature,
                            max_new_tokens=room, seed=seed)
    answers = [Candidate(d["completion"], ids, 0.0, 0.0, 0.0, True) for d, ids in zip(chosen, encoded)]
    branches = branch_points(policy, problems, answers)
    picked = [(i, b) for i, bs in enumerate(branches) for b in bs[:cfg.value_branches]]
    branched = repair(policy, [problems[i] for i, _ in picked], [b for _, b in picked], room) if picked else []
    found: dict[int, list] = {}
    for (i, _), result in zip(picked, branched):
        found.setdefault(i, []).extend(result.candidates)
    for i, result in enumerate(run_search(problems, sampling, policy)):
        found.setdefault(i, []).extend(result.candidates)
    rows = []
    for i, (demo, problem) in enumerate(zip(chosen, problems)):
        right = task.extract(problem, demo["completion"])
        rows.append({"prompt": demo["prompt"], "completion": demo["completion"], "label": True})
        rows += [{"prompt": demo["prompt"], "completion": c.completion,
                  "label": task.extract(problem, c.completion) == right} for c in found.get(i, []) if c.finished]
    return rows


@dataclass
class ValueCycle:
    """What train_cycle_value did: the model (None when the labels could not train one) and what to record."""

    model: object | None
    record: dict


def train_cycle_value(current: Policy, candidate: Policy, newest: list[dict], older: list[dict], cfg: LoopConfig,
                      rng: random.Random, calibration_problems: list[Problem], max_new_tokens: int,
                      greedy: dict | None = None) -> ValueCycle:
    """Train the candidate's value model on this cycle's labelled candidates and a replay share of earlier ones,
    continuing from the current version's (a first one starts from a copy of the policy), then calibrate its accept
    threshold on held-out problems with answers (when there are any) with the candidate's greedy answers (`greedy`:
    those the gate already decoded, problem id -> Candidate; the rest are decoded here).

    The current version's model is kept instead, recalibrated, where training it would not pay: when it still
    tells this cycle's right candidates from wrong ones at cfg.value_refresh_auroc or better, when it does so at
    less than cfg.value_learning_auroc (what it was taught so far does not carry to new candidates), or when the
    cycle's labels are all of one kind. Its training costs every promoted cycle cfg.value's time budget (30 s against
    a cycle's 65-140 s on addition)."""
    from agent.value import train_value

    replay = rng.sample(older, min(len(older), int(len(newest) * cfg.value_replay_fraction)))
    data = newest + replay
    labels = {row["label"] for row in data}
    start = getattr(current, "value_model", None)
    start = start if start is not None and start.cfg.trunk == cfg.value.trunk == "tuned" else None
    one_kind = labels != {True, False}
    if one_kind and start is None:
        return ValueCycle(None, {"skipped": f"{len(data)} labelled candidates, "
                                            f"{'none wrong' if True in labels else 'none right'}: nothing to tell apart"})
    fit = judged_auroc(start, newest, rng) if start is not None and not one_kind and cfg.value_refresh_auroc < 1 else None
    pays = fit is None or cfg.value_learning_auroc <= fit < cfg.value_refresh_auroc
    if start is not None and (one_kind or not pays):
        vm, kept_from = kept_judge(start), current.version
        kept = ("one kind of label" if one_kind else "still judges well" if fit >= cfg.value_refresh_auroc
                else "its training does not carry to new candidates")
    else:
        vm, kept_from, kept = train_value(current, data, cfg.value, start=start), None, None
    answered = [p for p in calibration_problems if p.answer is not None][:CALIBRATION_PROBLEMS]
    calibration = (calibrate(vm, candidate, answered, max_new_tokens=max_new_tokens, greedy=greedy) if answered
                   else {"accept_score": None, "problems": 0})
    trained = kept_from is None
    record = {"completions": len(data), "replayed": len(replay), "right": sum(row["label"] for row in data),
              "steps": vm.meta["steps"] if trained else 0, "loss": vm.meta["final_loss"] if trained else None,
              "continued_from": current.version if trained and start is not None else None,
              "kept_from": kept_from, "kept_because": kept, "auroc_before": _rounded(fit),
              "steps_in_all": vm.meta["steps_in_all"], "accept_score": calibration["accept_score"],
              "auroc": _rounded(calibration.get("auroc")), "calibrated_on": calibration["problems"]}
    return ValueCycle(vm, record)


JUDGED_CANDIDATES = 1024  # the current judge's check: one batched scoring pass, about a second on the built-in policy


def judged_auroc(judge, rows: list[dict], rng: random.Random) -> float | None:
    """How well `judge` tells right from wrong among (a sample of) labelled candidates it has not trained on: the
    AUROC of its values of the whole completions (None without both labels in the sample)."""
    from search.calibration import auroc

    sample = rng.sample(rows, min(len(rows), JUDGED_CANDIDATES))
    values = judge.score([row["prompt"] for row in sample], [row["completion"] for row in sample])
    return auroc([v[-1] for v in values], [bool(row["label"]) for row in sample])


def kept_judge(judge):
    """The current version's value model for the candidate: the same weights (neither trains them further: a
    later cycle continues from a copy) with its own meta, so that calibrating it leaves the current one's as is."""
    from agent.value import ValueModel

    return ValueModel(judge.trunk, judge.tokenizer, judge.cfg, judge.head, judge.mean, judge.std, dict(judge.meta))


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
