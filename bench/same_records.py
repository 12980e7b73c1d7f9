"""The loop's records with step-bounded fine-tunes, for comparing two versions of the code exactly.

Every fine-tune in `arbor run` is bounded by wall-clock time, so two runs of the same seed train for different
numbers of steps and their records drift apart from the warm start on: a timed run cannot show that a change kept
the loop's behaviour. Here every fine-tune stops at a step count and torch uses one thread, so the records (held-out
accuracy, filters with their precision, labels accepted, promotions) depend on the code alone. Run it once per
version, each from that version's tree (`python -m`: bench/queue.py would hide the standard library's queue
from a script run by path), and compare the JSON:

    git worktree add /tmp/before REV
    (cd /tmp/before && python -m bench.same_records /tmp/home-before) > before.json
    python -m bench.same_records /tmp/home-after > after.json
    cmp before.json after.json

`--value-model` trains the judge beside each promoted version as `arbor run --value-model` does (its own training
stays timed). The judge never feeds the policy's data unless a value floor filters labels, so the two records of
one version of the code must be identical, whatever the judge learned:

    python -m bench.same_records /tmp/home-none > none.json
    python -m bench.same_records /tmp/home-value --value-model > value.json
    cmp none.json value.json

It also runs on the code from before agent/config.py existed (the config classes are then looked up where they
were).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

try:
    from agent.config import LoopConfig, TrainConfig, WarmStartConfig
except ImportError:  # a version from before agent/config.py
    from agent.loop import LoopConfig, WarmStartConfig
    from agent.trainer import TrainConfig
from agent.runner import RunInputs, run_main
from agent.settings import Settings

KEPT = ("cycle", "policy_version", "candidate", "promoted", "frontier", "heldout", "self_verified", "gate", "accepted",
        "filters", "search_tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description="the loop's records with step-bounded fine-tunes")
    parser.add_argument("home", type=Path)
    parser.add_argument("--value-model", action="store_true", help="also train a judge beside each promoted version")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reductions in one order: the same floats run to run
    home = args.home
    shutil.rmtree(home, ignore_errors=True)
    cfg = LoopConfig(cycles=4, problems_per_cycle=600, examples_per_cycle=1200, heldout_per_difficulty=40,
                     max_difficulty=12, report_difficulties=(4, 8, 12), answer_tokens_per_cycle=None,
                     train=TrainConfig(learning_rate=5e-4, time_budget_s=1e6, max_steps=120),
                     warm_start=WarmStartConfig(examples_per_difficulty=400, mastery=None,
                                                train=TrainConfig(learning_rate=3e-3, time_budget_s=1e6, max_steps=1500)))
    if args.value_model:
        cfg.value_model = True
    report = run_main(Settings(home=home, device="cpu"), cfg, RunInputs(run_name="same-records"))
    print(json.dumps([{k: c[k] for k in KEPT} for c in report["cycles"]], sort_keys=True))


if __name__ == "__main__":
    main()
