"""Label proposals from the same policies three ways: parts trusted only at lengths mastered to the bar; parts past
that bound judged by the task's own checks; every part so judged, down to lengths too short to split
(SelectConfig.verify_proposal_parts).

For chosen cycles of a finished addition run, the policy that cycle searched with and the gate metric of its latest
evaluation (what the loop's selection trusts) label the same fresh problems at the given lengths with each rule.
Per cycle and length: the share of problems labelled, the labels' precision against the true sums, and the
seconds each rule spent. The baseline (trusted lengths only) runs in the same process on the same problems.

    python -m bench.proposal_parts /tmp/arbor-to100/addition-label_free-s1 bench-addition-label_free-s1 \\
        --cycles 8 12 --difficulties 40 48 --problems 200

Prints one JSON object (last line) and writes bench/results/proposal-parts.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from agent.config import LoopConfig, SelectConfig
from agent.evaluation import greedy_solver
from agent.registry import PolicyRegistry
from agent.proposals import ProposedLabels, mastered_up_to, memoized, trusted_only, verified_past
from agent.select import Pseudo
from agent.settings import Settings
from agent.store import Store
from search import SearchResult
from tasks import Solve, get_task

RESULTS = Path(__file__).parent / "results"


def label_with(parts: Solve, problems, task) -> tuple[list, float]:
    """The proposals' labels for `problems`, their parts answered by `parts` (None where the two cuts do not agree),
    and the seconds they took."""
    dropped = [Pseudo(SearchResult(p, [], "greedy", "probe")) for p in problems]
    start = time.monotonic()
    added = ProposedLabels(task.label_proposals())(dropped, task, parts)
    seconds = time.monotonic() - start
    labelled = {id(p): p.answer for p in added}
    return [labelled.get(id(p)) for p in dropped], seconds


def rules(solve: Solve, task, trusted: float) -> dict[str, Solve]:
    """trusted_only: answers as they are up to the bound (verify_proposal_parts off); verified_parts: past the bound
    answers that pass the checks (the default); verified_all: every answer checked, down to lengths too short to
    split (proposal_mastery unset)."""
    return {"trusted_only": trusted_only(memoized(solve), trusted),
            "verified_parts": verified_past(memoized(solve), task, trusted),
            "verified_all": verified_past(memoized(solve), task, float("-inf"))}


def run_arguments(description: str) -> argparse.ArgumentParser:
    """A probe's parser, starting with the finished run it reads (its ARBOR home and name)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("home", type=Path, help="the run's ARBOR home")
    parser.add_argument("run", help="the run's name in that home")
    return parser


def run_records(home: Path, run: str) -> tuple[dict, PolicyRegistry]:
    """A finished run's cycle records by cycle, and the registry that holds its policies."""
    settings = Settings(home=home, device="cpu")
    report = json.loads((settings.runs_dir / run / "report.json").read_text())
    return {c["cycle"]: c for c in report["cycles"]}, PolicyRegistry(settings.policies_dir, Store(settings.db_url))


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, nargs="+", required=True,
                        help="cycles whose search policy and trust bound are probed")
    parser.add_argument("--difficulties", type=int, nargs="+", required=True)
    parser.add_argument("--problems", type=int, default=200, help="fresh problems per difficulty")
    parser.add_argument("--out", type=Path, default=RESULTS / "proposal-parts.json")
    args = parser.parse_args()

    records, registry = run_records(args.home, args.run)
    task = get_task("addition")
    bar = SelectConfig().proposal_mastery
    rows = []
    for cycle in args.cycles:
        before = records[cycle - 1]  # the policy this cycle searched with, and its latest evaluation
        trusted = mastered_up_to(before["self_verified"], bar)
        policy = registry.load(before["policy_version"], "cpu")
        for difficulty in args.difficulties:
            problems = task.generate(difficulty, args.problems, seed=10_000 + cycle, split="train")
            solve = greedy_solver(policy, replace(LoopConfig().search, max_new_tokens=task.max_new_tokens(difficulty)))
            row = {"cycle": cycle, "policy": before["policy_version"], "difficulty": difficulty,
                   "trusted_up_to": trusted if trusted != float("-inf") else None}
            for name, parts in rules(solve, task, trusted).items():
                labels, seconds = label_with(parts, problems, task)
                given = [(label, p.answer) for label, p in zip(labels, problems) if label is not None]
                row[name] = {"labelled": round(len(given) / len(problems), 3),
                             "precision": round(sum(a == b for a, b in given) / len(given), 3) if given else None,
                             "seconds": round(seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"benchmark": "proposal_parts", "run": args.run, "problems_per_difficulty": args.problems,
               "proposal_mastery": bar, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
