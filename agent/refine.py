"""Iterative refinement: search, show the policy its attempts and the verdicts, search again.

Round 0 searches the problem's own prompt. Round r >= 1 searches a prompt that holds every earlier round's attempt
and its verdict, oldest first, with the problem last so that the completion continues the problem as in round 0:

    # attempt: 0721
    # feedback: rejected by the exact checker
    # attempt: 0821
    # feedback: rejected by the split check
    1234+5678=

The verdict (`judge_attempts`) is the checker's when the problem carries an answer; without one, the first of the
task's own label checks that the attempt fails (or that it is not an answer of the task's form); for a task with
no checks, the search's confidence. Never the answer itself. A job stops at the first attempt accepted (verified,
or passing every check), after `rounds` rounds, or when the policy has nothing new to try: a round never answers
with an answer already rejected for that problem (its repeats are dropped and the round resampled).

A policy learns the format before any refinement round has to succeed (`sibling_examples`): a problem the search
labelled, with its wrong sibling candidates shown as attempts (and the verdicts a job would give them), completed
by the label. The position-coupled built-in policy is shown no history (`shows_history`: measured, it cannot read
one): its later rounds repair a rejected answer at its least confident token, the smallest margin first, the rest
decoded greedily (search/repair.py), and search the problem afresh once no branch is left.

Plain functions over agent.job_search, callable without a broker; agent/jobs.py records the rounds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Callable

from agent.job_search import search_problems, trajectory_rows
from search import Candidate, SearchConfig, SearchResult, traits_of
from search.repair import Branch, branch_points, repair
from tasks import Problem, Solve, Task

RESAMPLES = 3  # searches of a round, beyond the first, for an answer not yet rejected
RESAMPLE_WIDTH = 4  # candidates a resample draws at least
REPAIR = "repair"  # the strategy a repaired answer's result names
MAX_SHOWN_ATTEMPTS = 3  # wrong siblings shown in one refinement example (a job's rounds 1-3 show as many)


@dataclass(frozen=True)
class Verdict:
    accepted: bool | None  # True: verified or passes every check; False: rejected; None: nothing could judge it
    text: str  # what the next round's prompt shows


@dataclass
class Round:
    result: SearchResult  # its problem's prompt is the round's prompt (answer and checker: the original's)
    verdict: Verdict  # of result.best
    resamples: int = 0  # searches repeated because every candidate repeated a rejected answer
    branch: Branch | None = None  # the rejected answer's branch this round repaired (None: a search)

    @property
    def best(self) -> Candidate:
        return self.result.best


def answer_key(task: Task, problem: Problem, completion: str) -> str:
    """What makes two attempts the same answer: the task's reading of it, or the stripped text when malformed."""
    return task.extract(problem, completion) or completion.strip()


def judge_attempts(problems: list[Problem], attempts: list[Candidate], task: Task,
                   solve: Solve | None) -> list[Verdict]:
    """Each attempt's verdict: the checker's where its problem has an answer; else the format, then the task's label
    checks in order (batched, one solve per check); else, for a task with none, the search's confidence."""
    verdicts: list[Verdict | None] = [None] * len(problems)
    undecided = []
    for i, (p, a) in enumerate(zip(problems, attempts)):
        if a.verified is not None:
            verdicts[i] = Verdict(a.verified, f"{'accepted' if a.verified else 'rejected'} by the {p.checker} checker")
        elif task.extract(p, a.completion) is None:
            verdicts[i] = Verdict(False, "rejected: not an answer of the expected form")
        else:
            undecided.append(i)
    checks = task.label_checks()
    if undecided and checks and solve is None:
        raise ValueError(f"task {task.name!r} has label checks: judging an attempt needs a solver")
    for name, check in checks.items():
        if not undecided:
            break
        passed = check([problems[i] for i in undecided],
                       [answer_key(task, problems[i], attempts[i].completion) for i in undecided], solve)
        for i, ok in zip(undecided, passed):
            if not ok:
                verdicts[i] = Verdict(False, f"rejected by the {name} check")
        undecided = [i for i, ok in zip(undecided, passed) if ok]
    for i in undecided:
        verdicts[i] = (Verdict(True, f"passes the {' and '.join(checks)} check{'s' if len(checks) > 1 else ''}")
                       if checks else
                       Verdict(None, f"unchecked; confidence {attempts[i].mean_logprob:.2f} mean log-prob per token"))
    return verdicts


def shows_history(policy) -> bool:
    """Whether a round's prompt shows the earlier attempts to this policy. Not to a position-coupled built-in policy:
    any line above the problem takes its accuracy from 1.00 to 0.00 (100 six-digit problems, teacher-forced and
    decoded alike), and 200 fine-tune steps with 30% such examples in the mix left refinement rounds solving none
    of what round 0 missed while independent samples gained 0.30, at 8x the time per step (the long prompts pad
    every batch). Its rounds repair the rejected answers instead (search/repair.py)."""
    config = getattr(getattr(policy, "model", None), "config", None)
    return getattr(config, "position_scheme", "sequential") != "coupled"


def round_prompt(problem: Problem, history: list[tuple[str, str]]) -> str:
    """The problem after the attempts so far (oldest first), each as (completion, verdict text)."""
    shown = "".join(f"# attempt: {attempt.strip()}\n# feedback: {text}\n" for attempt, text in history)
    return shown + problem.prompt


def _sampled(cfg: SearchConfig, at_least: int = 1) -> dict:
    """`cfg`'s changes for a search of the same prompt again: a deterministic search (greedy, beams) as T=1 samples
    of its width, and at least `at_least` candidates where it samples (MCTS and step beam: only a new seed)."""
    if cfg.strategy in ("mcts", "step_beam"):
        return {}
    if traits_of(cfg.strategy).samples:
        return {"n": max(cfg.n, at_least)}
    width = 1 if cfg.strategy == "greedy" else cfg.beams
    return {"strategy": "best_of_n", "n": max(width, at_least), "temperature": 1.0}


def _resample_config(cfg: SearchConfig, attempt: int) -> SearchConfig:
    # a policy sure of a wrong answer repeats it most of the time: a resample draws RESAMPLE_WIDTH candidates at once
    return replace(cfg, seed=cfg.seed + 7919 * attempt, **_sampled(cfg, RESAMPLE_WIDTH))


def _without_rejected(problems: list[Problem], asked: list[Problem], found: list[SearchResult],
                      rejected: list[set[str]], task: Task, policy, cfg: SearchConfig
                      ) -> tuple[list[SearchResult], list[int]]:
    """The round's results (of `asked`, the round prompts of `problems`) with every candidate that repeats a rejected
    answer dropped; a problem left with none is searched again (up to RESAMPLES times, its tokens counted). A result
    may end with no candidates: nothing new."""
    resamples = [0] * len(asked)

    def fresh(k: int, result: SearchResult, spent: SearchResult) -> SearchResult:
        # answers are read against the problem itself: the round prompt's history is not part of it
        kept = [c for c in result.candidates if answer_key(task, problems[k], c.completion) not in rejected[k]]
        return replace(result, candidates=kept, generated_tokens=spent.generated_tokens,
                       forward_passes=spent.forward_passes)

    out = [fresh(k, r, r) for k, r in enumerate(found)]
    for attempt in range(1, RESAMPLES + 1):
        empty = [k for k, r in enumerate(out) if not r.candidates]
        if not empty:
            break
        again = search_problems([asked[k] for k in empty], policy, _resample_config(cfg, attempt))
        for k, r in zip(empty, again):
            spent = replace(out[k], generated_tokens=out[k].generated_tokens + r.generated_tokens,
                            forward_passes=out[k].forward_passes + r.forward_passes)
            out[k] = fresh(k, r, spent)
            resamples[k] += 1
    return out, resamples


def refine(problem: Problem, policy, cfg: SearchConfig, rounds: int, task: Task | None = None,
           solve: Solve | None = None, on_round: Callable[[int, Round], None] | None = None) -> list[Round]:
    """Search up to `rounds` rounds; returns one Round per round searched (round 0 first). Every candidate is verified
    against the original answer. `task` (default: the generic Task) and `solve` give label-free verdicts."""
    each = None if on_round is None else (lambda r, found: on_round(r, found[0]))
    return refine_many([problem], policy, cfg, rounds, task, solve, each)[0]


def refine_many(problems: list[Problem], policy, cfg: SearchConfig, rounds: int, task: Task | None = None,
                solve: Solve | None = None,
                on_round: Callable[[int, list[Round]], None] | None = None) -> list[list[Round]]:
    """`refine` for many problems at once: each round searches every problem still going in one batch.
    `on_round(r, rounds)` hears the round's rounds (the problems still going, in order)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (got rounds={rounds})")
    task = task or Task()
    history = shows_history(policy)
    out: list[list[Round]] = [[] for _ in problems]
    rejected: list[set[str]] = [set() for _ in problems]
    branches: list[list[Branch]] = [[] for _ in problems]  # a policy shown no history: its mistakes' branches
    going = list(range(len(problems)))
    for r in range(rounds):
        asked = [replace(problems[i], prompt=round_prompt(problems[i], [(x.best.completion, x.verdict.text)
                                                                        for x in out[i]]))
                 if r and history else problems[i] for i in going]
        # the same prompt again is searched afresh: a new seed, and samples where the search is deterministic
        round_cfg = cfg if r == 0 or history else replace(cfg, seed=cfg.seed + 104_729 * r, **_sampled(cfg))
        found, picked = _round_search(asked, [branches[i] for i in going], policy, round_cfg)
        found, resamples = _without_rejected([problems[i] for i in going], asked, found,
                                             [rejected[i] for i in going], task, policy, round_cfg)
        tried = [k for k, result in enumerate(found) if result.candidates]  # the others have nothing new: they stop
        verdicts = judge_attempts([problems[going[k]] for k in tried], [found[k].best for k in tried], task, solve)
        this_round, wrong = [], []
        for k, verdict in zip(tried, verdicts):
            i = going[k]
            repaired = picked[k] if found[k].strategy == REPAIR else None  # not when a resample replaced it
            out[i].append(Round(found[k], verdict, resamples[k], repaired))
            this_round.append(out[i][-1])
            if verdict.accepted is False:
                rejected[i].add(answer_key(task, problems[i], found[k].best.completion))
                wrong.append((i, out[i][-1]))
        if not history and wrong and r + 1 < rounds:
            _add_branches(policy, problems, wrong, branches)
        if on_round is not None and this_round:
            on_round(r, this_round)
        going = [going[k] for k, v in zip(tried, verdicts) if v.accepted is not True]
        if not going:
            break
    return out


def _round_search(asked: list[Problem], branches: list[list[Branch]], policy, cfg: SearchConfig
                  ) -> tuple[list[SearchResult], list[Branch | None]]:
    """A round's search: the repair of the smallest-margin untried branch of a rejected answer where there is one
    (search/repair.py), the round's own search elsewhere. Returns the results and the branch each repaired."""
    picked = [heapq.heappop(b) if b else None for b in branches]
    at = [k for k, b in enumerate(picked) if b is not None]
    found: list[SearchResult | None] = [None] * len(asked)
    if at:
        repaired = repair(policy, [asked[k] for k in at], [picked[k] for k in at], cfg.max_new_tokens, REPAIR)
        for k, result in zip(at, repaired):
            found[k] = result
    rest = [k for k in range(len(asked)) if found[k] is None]
    if rest:
        for k, result in zip(rest, search_problems([asked[k] for k in rest], policy, cfg)):
            found[k] = result
    return found, picked


def _add_branches(policy, problems: list[Problem], wrong: list[tuple[int, "Round"]],
                  branches: list[list[Branch]]) -> None:
    """The branches of this round's rejected answers join their problems' queues; a repaired answer branches only
    after its own branch point (before it, its tokens are an earlier answer's, whose branches are queued already)."""
    starts = [x.branch.position + 1 if x.branch is not None else 0 for _, x in wrong]
    found = branch_points(policy, [problems[i] for i, _ in wrong], [x.best for _, x in wrong], starts)
    for (i, _), points in zip(wrong, found):
        for branch in points:
            heapq.heappush(branches[i], branch)


def _rank(x: Round) -> tuple:
    # an accepted attempt beats any other; then a verified one; otherwise the search's own score decides
    return (x.verdict.accepted is True, bool(x.best.verified), x.best.score)


def best_of_rounds(rounds: list[Round]) -> tuple[Candidate, int]:
    """The best attempt over all rounds and the round that produced it."""
    at = max(range(len(rounds)), key=lambda r: (_rank(rounds[r]), -r))
    return rounds[at].best, at


def refine_rows(problem: Problem, rounds: list[Round], job_id: str | None = None
                ) -> tuple[list[list[dict]], list[int | None]]:
    """Trajectory rows per round, and per round the earlier round whose attempt it refined: the best one so far
    (None for round 0); the store links them through `parent_id`. Only the job's overall best is marked `is_best`
    (the one training uses, paired with the problem's own prompt); a round's own prompt is kept in `prompt`."""
    per_round, parents = [], []
    for r, x in enumerate(rounds):
        rows = trajectory_rows(x.result, job_id=job_id, round=r)
        for row in rows:
            row["is_best"] = False
            row["prompt"] = None if x.result.problem.prompt == problem.prompt else x.result.problem.prompt
        per_round.append(rows)
        parents.append(best_of_rounds(rounds[:r])[1] if r else None)
    if rounds:
        per_round[best_of_rounds(rounds)[1]][0]["is_best"] = True  # rows are ranked best first
    return per_round, parents


def tried(rounds: list[Round]) -> list[dict]:
    """What each round answered and why it was rejected, and what its search spent (an adaptive search: each stage
    and why it ran) (a job's result; the web view's rounds table)."""
    return [{"round": r, "answer": x.best.completion, "verdict": x.verdict.text, "accepted": x.verdict.accepted,
             "resamples": x.resamples, "how": _how(x), "tokens": x.result.generated_tokens,
             "forward_passes": x.result.forward_passes, "stages": x.result.stages}
            for r, x in enumerate(rounds)]


def _how(x: Round) -> str:
    if x.branch is None:
        return "search"
    return (f"repair: token {x.branch.position + 1} of a rejected answer changed (margin {x.branch.margin:.2f}), "
            "the rest greedy")


def refinement_examples(results: list[SearchResult], round_prompts: list[str | None]) -> list[dict]:
    """Training examples from refinement jobs: a result whose best attempt verified in a later round (its round
    prompt is given: it holds the earlier attempts and their verdicts) becomes {round prompt, attempt}."""
    return [{"prompt": prompt, "completion": r.best.completion}
            for r, prompt in zip(results, round_prompts) if prompt is not None and r.best.verified]


def sibling_examples(results: list[SearchResult], labels: list[dict], task: Task, solve: Solve | None) -> list[dict]:
    """Refinement examples from one search (RISE's multi-turn examples without running any round): for a problem
    with a label (`labels`: {problem_id, completion}, verified or label-accepted), its distinct candidates that
    state another answer and that a job would reject, shown as the attempts of rounds 1, 2, ... (at most
    MAX_SHOWN_ATTEMPTS), each completed by the label. The verdicts are `judge_attempts`' own, so the prompt is
    the one a refinement job would write."""
    label_of = {e["problem_id"]: e["completion"] for e in labels}
    problems, wrong = [], []
    for result in results:
        label = label_of.get(result.problem.id)
        if label is None:
            continue
        seen = {answer_key(task, result.problem, label)}
        for c in result.candidates:
            key = answer_key(task, result.problem, c.completion)
            if key not in seen and c.verified is not True:
                seen.add(key)
                problems.append(result.problem)
                wrong.append(c)
    verdicts = judge_attempts(problems, wrong, task, solve) if wrong else []
    shown: dict[str, list[tuple[str, str]]] = {}
    examples = []
    for p, c, v in zip(problems, wrong, verdicts):
        history = shown.setdefault(p.id, [])
        if v.accepted is not False or len(history) >= MAX_SHOWN_ATTEMPTS:
            continue  # a job would have stopped at an attempt that passes
        history.append((c.completion, v.text))
        examples.append({"prompt": round_prompt(p, history), "completion": label_of[p.id], "problem_id": p.id})
    return examples
