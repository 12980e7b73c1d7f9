"""How well a score tells right answers from wrong ones, and the threshold adaptive search (search/adaptive.py)
keeps a greedy answer above: calibrated on held-out problems with answers and stored with the value model."""

from __future__ import annotations

from dataclasses import replace

from search.config import SearchConfig
from search.prompt_format import formatted_problems
from search.strategies import run_search


def calibrate(value_model, policy, problems: list, precision: float = 0.95, max_new_tokens: int = 64,
              budget_share: float | None = None, cfg: SearchConfig | None = None, greedy: dict | None = None) -> dict:
    """Set the value model's thresholds for adaptive search (search/adaptive.py) from `problems` with answers
    (held-out ones), kept in its meta and so saved with it. Two rules:

    - budget_share None: the policy's greedy answers are scored and checked, and accept_score is the lowest value
      at which the answers scoring at least that are right at `precision` (none reaches it: stays unset); `greedy`
      (problem id -> Candidate) gives answers the caller already decoded greedily, and only the missing ones are;
    - budget_share (e.g. 1/3): every adaptive stage runs on every problem (`cfg`'s n, simulations, ...), and the
      accept and give-up scores are the pair with which adaptive search, replayed on those candidates, is right
      most often while generating at most that share of best-of-n's tokens (compute-optimal by the value model)."""
    answered = [p for p in problems if p.answer is not None]
    if not answered:
        raise ValueError("calibration needs problems with answers (held-out ones)")
    if budget_share is not None:
        report = _calibrate_for_budget(value_model, policy, answered, budget_share,
                                       cfg or SearchConfig(strategy="adaptive", n=16, temperature=1.0),
                                       max_new_tokens)
        value_model.meta.update(accept_score=report["accept_score"], give_up_score=report["give_up_score"],
                                calibration=report)
        return report
    greedy = greedy or {}
    missing = [p for p in answered if p.id not in greedy]
    decoded = run_search(missing, SearchConfig(strategy="greedy", max_new_tokens=max_new_tokens), policy) if missing else []
    greedy = {**greedy, **{r.problem.id: r.best for r in decoded}}
    best = [greedy[p.id] for p in answered]
    values = _final_values(value_model, policy, answered, [[c] for c in best])
    right = [bool(c.verified) for c in best]
    threshold = calibrate_accept_score([v[0] for v in values], right, precision)
    kept = sum(v[0] >= threshold for v in values) if threshold is not None else 0
    report = {"accept_score": threshold, "precision": precision, "problems": len(answered),
              "greedy_accuracy": round(sum(right) / len(right), 4), "kept_share": round(kept / len(right), 4),
              "auroc": auroc([v[0] for v in values], right)}
    value_model.meta.update(accept_score=threshold, give_up_score=None, calibration=report)
    return report


def _final_values(value_model, policy, problems: list, candidates: list[list]) -> list[list[float]]:
    """The value of each candidate's whole completion (what the value scorer ranks by), per problem; -inf for one
    that did not finish (adaptive never trusts it)."""
    shown = formatted_problems(problems, policy.prompt_format, policy.tokenizer)  # as the value scorer sees them
    flat = [(p.prompt, c) for p, cs in zip(shown, candidates) for c in cs if c.finished]
    scored = iter(v[-1] for v in value_model.score([p for p, _ in flat], [c.token_ids for _, c in flat]))
    return [[next(scored) if c.finished else float("-inf") for c in cs] for cs in candidates]


def _calibrate_for_budget(value_model, policy, problems: list, budget_share: float, cfg: SearchConfig,
                          max_new_tokens: int) -> dict:
    from search.adaptive import may_give_up_after, run_stage, stages

    plan = stages(replace(cfg, max_new_tokens=max_new_tokens, accept_score=0.0))
    shown = formatted_problems(problems, policy.prompt_format, policy.tokenizer)  # as run_search shows them
    # per stage, per problem: (tokens spent, [(value, right) of each candidate])
    runs, greedy_answers, branches = [], [None] * len(problems), [None] * len(problems)
    for stage, stage_cfg in plan:
        found, branches = run_stage(stage, stage_cfg, shown, policy, greedy_answers, branches)
        if stage == "greedy":
            greedy_answers = [r.best for r in found]
        values = _final_values(value_model, policy, problems, [r.candidates for r in found])
        runs.append([(r.generated_tokens, [(v, bool(c.verified)) for v, c in zip(vs, r.candidates)])
                     for r, vs in zip(found, values)])
    sampling = [i for i, (_, c) in enumerate(plan) if c.strategy == "best_of_n"]
    escalations = [i for i, (stage, _) in enumerate(plan) if may_give_up_after(stage)]
    best_of_n_tokens = sum(runs[i][p][0] for i in sampling for p in range(len(problems))) / len(problems)
    budget = budget_share * best_of_n_tokens
    paths = running_best(runs)
    finite = sorted({v for stage in runs for _, cands in stage for v, _ in cands if v != float("-inf")})
    grid = sorted({finite[round(q * (len(finite) - 1))] for q in (i / 60 for i in range(61))}) if finite else [0.0]
    best = None
    for accept in grid + [float("inf")]:
        for give_up in [None] + [g for g in grid[:30] if g < accept]:
            accuracy, tokens = replay_adaptive(paths, escalations, accept, give_up)
            within = tokens <= budget
            key = (within, accuracy if within else -tokens, -tokens)  # over budget everywhere: the cheapest
            if best is None or key > best[0]:
                best = (key, accept, give_up, accuracy, tokens)
    _, accept, give_up, accuracy, tokens = best
    greedy_right = [bool(cands) and cands[0][1] for _, cands in runs[0]]
    return {"rule": "budget", "budget_share": budget_share, "problems": len(problems),
            "accept_score": None if accept == float("inf") else accept, "give_up_score": give_up,
            "replayed_accuracy": round(accuracy, 4), "replayed_tokens": round(tokens, 2),
            "best_of_n_tokens": round(best_of_n_tokens, 2), "within_budget": tokens <= budget,
            "greedy_accuracy": round(sum(greedy_right) / len(problems), 4)}


def running_best(runs: list[list[tuple[int, list[tuple[float, bool]]]]]) -> list[list[tuple[float, float, bool]]]:
    """Per problem, after each stage: (tokens spent so far, best value so far, whether that candidate is right).
    runs[stage][problem] = (the stage's tokens, [(value, right) of each of its candidates])."""
    out = []
    for p in range(len(runs[0])):
        spent, top, top_right, path = 0, float("-inf"), False, []
        for stage in runs:
            tokens, cands = stage[p]
            spent += tokens
            for value, ok in cands:
                if value > top:
                    top, top_right = value, ok
            path.append((spent, top, top_right))
        out.append(path)
    return out


def replay_adaptive(paths: list[list[tuple[float, float, bool]]], escalations: list[int], accept: float,
                    give_up: float | None) -> tuple[float, float]:
    """Adaptive search replayed on candidates found in advance (running_best's paths): (accuracy, mean tokens) when
    a problem stops at the first stage whose best candidate so far is valued at least `accept`, or, after one of
    the `escalations` stages (repairs and samples), under `give_up`."""
    right = tokens = 0
    escalations = set(escalations)
    for path in paths:
        for s, (spent, top, top_right) in enumerate(path):
            if top >= accept or s == len(path) - 1 or (give_up is not None and s in escalations and top < give_up):
                break
        right += top_right
        tokens += spent
    return right / len(paths), tokens / len(paths)


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
