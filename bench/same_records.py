"""The loop's records with step-bounded fine-tunes, for comparing two versions of the code exactly.

Every fine-tune in `arbor run` is bounded by wall-clock time, so two runs of the same seed train for different
numbers of steps and their records drift apart from the warm start on: a timed run cannot show that a change kept
the loop's behaviour. Here every fine-tune stops at a step count and torch uses one thread, so the records (held-out
accuracy, filters with their precision, labels accepted, promotions) depend on the code alone. Run it once per
version, each with that version's tree first on the path, and compare the JSON:

    git worktree add /tmp/before REV
    PYTHONPATH=/tmp/before python bench/same_records.py /tmp/home-before > before.json
    PYTHONPATH=. python bench/same_records.py /tmp/home-after > after.json
    cmp before.json after.json

It also runs on the code from before agent/config.py existed (the config classes are then looked up where they
were).
"""

import json
import shutil
import sys
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
    torch.set_num_threads(1)  # reductions in one order: the same floats run to run
    home = Path(sys.argv[1])
    shutil.rmtree(home, ignore_errors=True)
    cfg = LoopConfig(cycles=4, problems_per_cycle=600, examples_per_cycle=1200, heldout_per_difficulty=40,
                     max_difficulty=12, report_difficulties=(4, 8, 12), answer_tokens_per_cycle=None,
                     train=TrainConfig(learning_rate=5e-4, time_budget_s=1e6, max_steps=120),
                     warm_start=WarmStartConfig(examples_per_difficulty=400, mastery=None,
                                                train=TrainConfig(learning_rate=3e-3, time_budget_s=1e6, max_steps=1500)))
    report = run_main(Settings(home=home, device="cpu"), cfg, RunInputs(run_name="same-records"))
    print(json.dumps([{k: c[k] for k in KEPT} for c in report["cycles"]], sort_keys=True))


if __name__ == "__main__":
    main()
