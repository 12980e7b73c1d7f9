"""A run's last policy on fresh held-out problems at the target length: the loop may read a length past its
evaluated window from a sample of 25 problems, so a benchmark's "reached" is confirmed on more problems than that.

    python -m bench.confirm_target /tmp/arbor-to100/addition-label_free-s0 bench-addition-label_free-s0 --target 100

Prints one JSON object: the policy version, the target, the number of problems and their greedy accuracy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from agent.config import LoopConfig
from agent.evaluation import evaluate_policy
from agent.registry import PolicyRegistry
from agent.settings import Settings
from agent.store import Store
from tasks import get_task

CONFIRM_SEED = 7_919  # a held-out stream the loop's own held-out sets (seeded by the run) do not use


def confirm(home: Path, version: str, task_name: str, target: int, n: int = 200) -> dict:
    """Greedy accuracy of `version` (in the ARBOR home `home`) on `n` fresh held-out problems of length `target`."""
    settings = Settings(home=home, device="cpu")
    policy = PolicyRegistry(settings.policies_dir, Store(settings.db_url)).load(version, "cpu")
    task = get_task(task_name)
    problems = task.generate(target, n, seed=CONFIRM_SEED, split="heldout")
    search = replace(LoopConfig().eval_search, max_new_tokens=task.max_new_tokens(target))
    accuracy = evaluate_policy(policy, {str(target): problems}, search).accuracy[str(target)]
    return {"policy": version, "target": target, "problems": n, "accuracy": round(accuracy, 3)}


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """The recorded run a benchmark tool works on, and the length it aims at."""
    parser.add_argument("home", type=Path, help="the run's ARBOR home (a bench.selfimprove arm's folder)")
    parser.add_argument("run", help="the run's name in that home")
    parser.add_argument("--target", type=int, default=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--task", default="addition")
    args = parser.parse_args()
    report = json.loads((Settings(home=args.home, device="cpu").runs_dir / args.run / "report.json").read_text())
    version = report["cycles"][-1]["policy_version"]
    print(json.dumps({"run": args.run, **confirm(args.home, version, args.task, args.target, args.problems)}))


if __name__ == "__main__":
    main()
