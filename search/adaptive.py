"""Adaptive search: compute where it pays. Every problem is answered greedily first; a problem whose answer the
scorer does not trust (its score under the accept threshold) escalates to repairs of that answer (its least
confident tokens changed one at a time, the rest decoded greedily: search/repair.py), then two samples, four more
and the rest of the N (steps that double), and one still untrusted to MCTS. Each result keeps every stage's
candidates, ranked together, and says what each stage spent and why the next one ran (SearchResult.stages).

The threshold is SearchConfig.accept_score, or the one calibrated for the policy version's value model on held-out
problems (search/calibration.py, stored with the value model). A calibration for a token budget also sets a give-up
score: after a repair or sampling stage, a problem whose best answer is valued under it stops there, since the
stages that follow rarely find an answer where the first ones came nowhere near one.
"""

from __future__ import annotations

from dataclasses import replace

from search.beam import beam
from search.best_of_n import best_of_n
from search.config import SearchConfig
from search.greedy import greedy
from search.mcts import mcts
from search.prompt_format import RAW
from search.repair import Branch, branch_points, repair
from search.scorers import rank_all
from search.traits import traits_of
from search.types import SearchPolicy, SearchResult
from tasks import Problem

RUN = {"greedy": greedy, "best_of_n": best_of_n, "mcts": mcts}
REPAIR = "repair_"  # a repair stage's name: repair_1 changes the least confident token, repair_2 the next


def sample_sizes(n: int, first: int = 2) -> list[int]:
    """The n samples in steps that double (16: 2, 4, then 10), the last step taking the rest once what is left
    is under two steps' worth. Most answers that samples fix, a few samples fix (pass@4 0.77 against pass@16 0.84
    at the 3-digit frontier), so a problem whose first samples hold a trusted answer stops at 2 or 6; a step of 4
    samples first spent 39% of best-of-16's tokens for 91% of its gain."""
    sizes, total, size = [], 0, min(first, n)
    while total < n:
        if n - total - size < 2 * size:
            size = n - total
        sizes.append(size)
        total += size
        size *= 2
    return sizes


def stages(cfg: SearchConfig) -> list[tuple[str, SearchConfig]]:
    """Greedy; cfg.repairs repairs of the greedy answer; the n samples in doubling steps (each with its own seed:
    together the n), named by the samples drawn so far; MCTS."""
    sampled = replace(cfg, scorer=None)  # ranked again by adaptive's own scorer
    out = [("greedy", replace(sampled, strategy="greedy"))]
    out += [(f"{REPAIR}{k}", replace(sampled, strategy="greedy")) for k in range(1, cfg.repairs + 1)]
    drawn = 0
    for step, size in enumerate(sample_sizes(cfg.n)):
        drawn += size
        out.append((f"best_of_{drawn}", replace(sampled, strategy="best_of_n", n=size, seed=cfg.seed + step)))
    return out + [("mcts", replace(cfg, strategy="mcts"))]


def thresholds(cfg: SearchConfig, policy: SearchPolicy) -> tuple[float, float | None]:
    """(accept, give up): cfg.accept_score (with cfg.give_up_score), else the pair calibrated with the version's
    value model; a one-line refusal when there is neither."""
    if cfg.accept_score is not None:
        return cfg.accept_score, cfg.give_up_score
    meta = getattr(getattr(policy, "value_model", None), "meta", None) or {}
    if meta.get("accept_score") is None:
        raise ValueError(f"adaptive search needs accept_score, or a value model calibrated for it, and policy version "
                         f"{policy.version} has none: set accept_score or choose another strategy")
    give_up = cfg.give_up_score if cfg.give_up_score is not None else meta.get("give_up_score")
    return meta["accept_score"], give_up


def adaptive(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    threshold, give_up = thresholds(cfg, policy)
    scorer = cfg.build_scorer(policy)  # one instance for every stage: a value is computed once per candidate
    # MCTS values its leaves by that scorer; the sampling stages' own ranking is replaced by `scorer`'s below, so
    # they rank by the free confidence rather than score every candidate a second time
    cfg = replace(cfg, scorer=cfg.scorer or traits_of("adaptive").default_scorer)
    merged: list[SearchResult | None] = [None] * len(problems)
    greedy_answers: list = [None] * len(problems)
    branches: list[list[Branch] | None] = [None] * len(problems)  # the greedy answers', once a repair needs them
    pending = list(range(len(problems)))
    plan = stages(cfg)
    for stage, stage_cfg in plan:
        if not pending:
            break
        found, known = run_stage(stage, stage_cfg, [problems[i] for i in pending], policy,
                                 [greedy_answers[i] for i in pending], [branches[i] for i in pending])
        for i, b in zip(pending, known):
            branches[i] = b
        for i, r in zip(pending, found):
            merged[i] = r if merged[i] is None else _joined(merged[i], r)
            if stage == "greedy":
                greedy_answers[i] = r.best
        last = stage == plan[-1][0]
        may_give_up = give_up is not None and may_give_up_after(stage)
        ranked = rank_all(scorer, [problems[i] for i in pending], [merged[i].candidates for i in pending])
        still = []
        for i, r, candidates in zip(pending, found, ranked):
            best = candidates[0]
            trusted = best.finished and best.score >= threshold
            hopeless = may_give_up and not trusted and (not best.finished or best.score < give_up)
            merged[i].candidates = candidates
            merged[i].stages.append({"stage": stage, "tokens": r.generated_tokens, "forward_passes": r.forward_passes,
                                     "best_score": round(best.score, 4) if best.finished else None,
                                     "accept_score": threshold, "give_up_score": give_up,
                                     "why": _why(trusted, last, best, threshold, hopeless, give_up)})
            if not trusted and not hopeless:
                still.append(i)
        pending = still
    for r in merged:
        r.strategy = "adaptive"
    return merged


def run_stage(stage: str, cfg: SearchConfig, problems: list[Problem], policy: SearchPolicy, greedy_answers: list,
              branches: list) -> tuple[list[SearchResult], list]:
    """One stage's results for `problems`, and the greedy answers' branches (a repair stage finds those it needs;
    `greedy_answers` and `branches` are per problem, unused before the first repair)."""
    if stage.startswith(REPAIR):
        return repair_stage(int(stage.removeprefix(REPAIR)), problems, greedy_answers, branches, cfg, policy)
    return RUN[cfg.strategy](problems, cfg, policy), branches


def may_give_up_after(stage: str) -> bool:
    """A give-up score stops a problem after a repair or sampling stage (greedy is always followed by more)."""
    return stage.startswith(REPAIR) or stage.startswith("best_of_")


def repair_stage(k: int, problems: list[Problem], answers: list, branches: list[list[Branch] | None],
                 cfg: SearchConfig, policy: SearchPolicy) -> tuple[list[SearchResult], list[list[Branch]]]:
    """Each answer repaired at its k-th least confident token (k from 1), the rest decoded greedily; an answer with
    fewer tokens gets no candidate. Branches not yet known (None) are found in one teacher-forced pass (a forward
    pass each). Returns the results and every answer's branches, for the next repair stage."""
    todo = [j for j, b in enumerate(branches) if b is None]
    branches = list(branches)
    if todo:
        # the problems are already in the policy's format (run_search formats them once)
        for j, found in zip(todo, branch_points(policy, [problems[j] for j in todo], [answers[j] for j in todo],
                                                fmt=RAW)):
            branches[j] = found
    at = [j for j in range(len(problems)) if len(branches[j]) >= k]
    repaired = repair(policy, [problems[j] for j in at], [branches[j][k - 1] for j in at], cfg.max_new_tokens,
                      "adaptive", fmt=RAW)
    results = [SearchResult(p, [], "adaptive", policy.version) for p in problems]
    for j, r in zip(at, repaired):
        results[j] = r
    for j in todo:
        results[j].forward_passes += 1
    return results, branches


def calibrated(policy: SearchPolicy) -> bool:
    return getattr(getattr(policy, "value_model", None), "accept_score", None) is not None


def auto(problems: list[Problem], cfg: SearchConfig, policy: SearchPolicy) -> list[SearchResult]:
    """A queue job's default: adaptive search once the version has a calibrated value model, beam search (which
    measured best at equal budget without one) before, or when the job reads through the context memory."""
    if calibrated(policy) and not (cfg.memory or cfg.recycling):
        return adaptive(problems, replace(cfg, strategy="adaptive"), policy)
    return beam(problems, replace(cfg, strategy="beam"), policy)


def _joined(earlier: SearchResult, later: SearchResult) -> SearchResult:
    """One result over both stages' candidates (a repeated completion kept once) and both stages' costs."""
    seen = {tuple(c.token_ids) for c in earlier.candidates}
    earlier.candidates += [c for c in later.candidates if tuple(c.token_ids) not in seen]
    earlier.generated_tokens += later.generated_tokens
    earlier.forward_passes += later.forward_passes
    return earlier


def _why(trusted: bool, last: bool, best, threshold: float, hopeless: bool = False, give_up: float | None = None) -> str:
    if trusted:
        return f"kept: best score {best.score:.3f} >= {threshold:.3f}"
    reason = f"best score {best.score:.3f} < {threshold:.3f}" if best.finished else "no answer finished"
    if hopeless:
        near = f"best score {best.score:.3f} < give-up {give_up:.3f}" if best.finished else "no answer finished"
        return f"gave up: {near}, more samples rarely help there"
    return f"last stage: {reason}, kept anyway" if last else f"escalated: {reason}"
