"""Which label checks catch a policy's wrong answers, and what the loop's selection keeps with them.

For one cycle of a finished addition run, the policy that cycle ended with (its record's version) and the gate
metric of its evaluation (what the next cycle's selection trusts):

- per length, on fresh problems, the policy's greedy answers judged by each check on its own and by the task's
  checks together: the share passed, the precision of what passed, and how many wrong answers passed
  (`split`: halves; `split_third`: cut after a third; `same_sum`: a twin with the same sum; `swap`: b+a; the
  task's `label_checks()`), and where split's wrong passes went wrong (the low or the high half);
- the loop's own selection (`arbor run`'s defaults) on the policy's best-of-4 search of the same lengths, twice
  in the same process on the same candidates: trusted proposal parts as they are (the rule before the one-level
  check) and the current rule; labels, precision and seconds of each.

    python -m bench.label_checks /tmp/arbor-to100/addition-label_free-s1 bench-addition-label_free-s1 \\
        --cycle 5 --difficulties 44 48 52 --problems 300

Prints one JSON object (last line) and writes bench/results/label-checks.json (or --out).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import agent.proposals as proposals
from agent.config import LoopConfig, SelectConfig
from agent.evaluation import greedy_solver
from agent.proposals import mastered_up_to, memoized
from agent.select import select
from bench.proposal_parts import run_arguments, run_records
from search import run_search
from tasks import Solve, get_task
from tasks.addition import _answer, compose, make_problem, operands, same_sum_check, split_check

RESULTS = Path(__file__).parent / "results"


def swap_check(problems, answers, solve: Solve) -> list[bool]:
    """Commutativity: the answer to b+a must equal the answer (the check addition dropped)."""
    swapped = [make_problem(*reversed(operands(p))) for p in problems]
    return [_answer(q, c) == a for q, c, a in zip(swapped, solve(swapped), answers)]


def cut_check(split_at):
    def check(problems, answers, solve: Solve) -> list[bool]:
        return [c == a for c, a in zip(compose(problems, solve, split_at), answers)]
    return check


CHECKS = {"split": split_check, "split_third": cut_check(lambda d: max(1, d // 3)),
          "same_sum": same_sum_check, "swap": swap_check}


def judged(passed: list[bool], right: list[bool]) -> dict:
    kept = [r for r, ok in zip(right, passed) if ok]
    return {"passed": round(len(kept) / len(right), 3), "precision": round(sum(kept) / len(kept), 3) if kept else None,
            "wrong_passed": sum(ok and not r for r, ok in zip(right, passed)), "wrong": right.count(False)}


def checks_alone(policy, task, difficulties: list[int], n: int) -> list[dict]:
    rows = []
    for d in difficulties:
        problems = task.generate(d, n, seed=random.Random(d).randint(10_000, 99_999), split="train")
        solve = memoized(greedy_solver(policy, replace(LoopConfig().search, max_new_tokens=task.max_new_tokens(d))))
        answers = [task.extract(p, c) or "" for p, c in zip(problems, solve(problems))]
        right = [a == p.answer for a, p in zip(answers, problems)]
        verdicts = {name: check(problems, answers, solve) for name, check in CHECKS.items()}
        together = [all(v) for v in zip(*(check(problems, answers, solve) for check in task.label_checks().values()))]
        low = high = 0
        for p, a, ok, r in zip(problems, answers, verdicts["split"], right):
            if ok and not r and a:
                first_wrong = next(i for i, (x, y) in enumerate(zip(a, p.answer)) if x != y)
                low, high = (low + 1, high) if first_wrong < d // 2 else (low, high + 1)
        row = {"difficulty": d, "accuracy": round(sum(right) / n, 3),
               **{name: judged(v, right) for name, v in verdicts.items()},
               "label_checks": {"names": list(task.label_checks()), **judged(together, right)},
               "split_wrong_passes_low_half": low, "split_wrong_passes_high_half": high}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def trusted_as_they_are(verified_past):
    """The rule before the one-level check: answers at trusted lengths stand unchecked."""
    def rule(solve: Solve, task, up_to: float) -> Solve:
        checked = verified_past(solve, task, up_to)

        def run(problems):
            trusted = [p.difficulty is not None and p.difficulty <= up_to for p in problems]
            plain = iter(solve([p for p, t in zip(problems, trusted) if t]) if any(trusted) else [])
            rest = iter(checked([p for p, t in zip(problems, trusted) if not t]) if not all(trusted) else [])
            return [next(plain) if t else next(rest) for t in trusted]
        return run
    return rule


def selection_both_ways(policy, task, metric: dict, difficulties: list[int], n: int) -> dict:
    cfg = LoopConfig()
    problems = [p for d in difficulties for p in task.generate(d, n, seed=4242)]
    search = replace(cfg.search, max_new_tokens=task.max_new_tokens(max(difficulties)))
    results = run_search(problems, search, policy)
    current, out = proposals.verified_past, {}
    for name, rule in (("trusted_as_they_are", trusted_as_they_are(current)), ("trusted_checked_once", current)):
        proposals.verified_past = rule
        try:
            start = time.monotonic()
            chosen = select(results, task, SelectConfig(), greedy_solver(policy, search), None, metric)
            seconds = time.monotonic() - start
        finally:
            proposals.verified_past = current
        out[name] = {"seconds": round(seconds, 1), "filters": chosen.filters}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0])
    parser.add_argument("--cycle", type=int, required=True, help="the cycle whose policy and evaluation are probed")
    parser.add_argument("--difficulties", type=int, nargs="+", required=True)
    parser.add_argument("--problems", type=int, default=300, help="fresh problems per difficulty")
    parser.add_argument("--out", type=Path, default=RESULTS / "label-checks.json")
    args = parser.parse_args()

    records, registry = run_records(args.home, args.run)
    record = records[args.cycle]
    policy = registry.load(record["policy_version"], "cpu")
    task = get_task("addition")
    trusted = mastered_up_to(record["self_verified"], SelectConfig().proposal_mastery)
    summary = {"benchmark": "label_checks", "run": args.run, "cycle": args.cycle, "policy": record["policy_version"],
               "frontier": record["frontier"], "problems_per_difficulty": args.problems,
               "trusted_up_to": trusted if math.isfinite(trusted) else None,
               "checks_alone": checks_alone(policy, task, args.difficulties, args.problems),
               "selection": selection_both_ways(policy, task, record["self_verified"], args.difficulties,
                                                args.problems)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
