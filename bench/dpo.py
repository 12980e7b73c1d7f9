"""Does a DPO pass on the search's own mistakes speed up self-improvement? train_method "sft" against "sft+dpo".

Both arms start from the same warm-started built-in policy (warmed once, adopted by each run as `arbor run --model`
would), run label-free on the built-in addition task with `arbor run`'s defaults otherwise, and spend the same
fine-tune time per cycle: the sft+dpo arm's DPO seconds are taken out of its SFT budget. Each arm stops at the
target (held-out greedy accuracy at the target difficulty) or at its time budget. The ratio compares the times
to the target (sft+dpo over sft; below 1: DPO helped). The budgets bound the trainers' steps; DPO's setup (the
reference copy, tokenising the pairs) lies outside them, so each cycle's measured train seconds are in the curves.

    python -m bench.dpo                                   # 20 digits, 900 s an arm after the warm start
    python -m bench.dpo --tiny --budget 60 --out /tmp/dpo.json   # a check that the script runs; its numbers mean nothing

Prints one JSON object (last line) and writes it, with both curves, to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from agent.config import LoopConfig, WarmStartConfig
from agent.config import BuiltinConfig
from agent.runner import RunInputs, run_main
from agent.settings import Settings
from agent.config import TrainConfig
from bench.selfimprove import shared_warm_start, target_reached
from search import SearchConfig

RESULTS = Path(__file__).parent / "results"


def tiny(cfg: LoopConfig, target: int) -> LoopConfig:
    """Sizes for a smoke run on a shared CPU: a small policy, few problems, a few seconds of warm start."""
    return replace(cfg, problems_per_cycle=64, heldout_per_difficulty=16, examples_per_cycle=256, max_difficulty=target + 2,
                   report_difficulties=(target,), eval_ahead=1, search=SearchConfig(strategy="best_of_n", n=4, temperature=1.0),
                   builtin=BuiltinConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
                   warm_start=WarmStartConfig(difficulties=(1, 2), examples_per_difficulty=100,
                                              train=TrainConfig(learning_rate=3e-3, time_budget_s=6.0, schedule="time_cosine")))


def arm_config(base: LoopConfig, method: str, cycle_s: float, dpo_s: float) -> LoopConfig:
    if method == "sft":
        return replace(base, train_method="sft", train=replace(base.train, time_budget_s=cycle_s))
    return replace(base, train_method="sft+dpo", train=replace(base.train, time_budget_s=cycle_s - dpo_s),
                   preference=replace(base.preference, time_budget_s=dpo_s))


def run_arm(method: str, cfg: LoopConfig, policy: Path, home: Path, target: int, accuracy: float) -> dict:
    shutil.rmtree(home, ignore_errors=True)

    def on_event(kind, payload):
        if kind == "cycle":
            r = payload
            dpo = r.train.get("dpo", {})
            print(f"[{method} {r.elapsed_s:7.1f}s] cycle {r.cycle} promoted={r.promoted} accepted={r.accepted} "
                  f"pairs={dpo.get('pairs', '-')} acc={ {k: round(v, 2) for k, v in r.heldout.items()} } t={r.seconds}", flush=True)

    start = time.monotonic()
    report = run_main(Settings(home=home, device="cpu"), cfg,
                      RunInputs(model=policy, run_name=f"bench-dpo-{method.replace('+', '-')}", task="addition"), on_event,
                      target_reached(target, accuracy))
    cycles = report["cycles"]
    reached = next((c for c in cycles if c["heldout"].get(str(target), 0.0) >= accuracy), None)
    return {
        "train_method": method,
        "reached": reached is not None,
        "seconds_to_target": reached["elapsed_s"] if reached else None,
        "final_accuracy_at_target": cycles[-1]["heldout"].get(str(target)),
        "cycles_run": len(cycles) - 1,
        "promotions": sum(c["promoted"] for c in cycles),
        "wall_s": round(time.monotonic() - start, 1),
        "curve": [{"cycle": c["cycle"], "elapsed_s": c["elapsed_s"], "frontier": c["frontier"], "promoted": c["promoted"],
                   "heldout": c["heldout"], "accepted": c["accepted"], "train_s": c["seconds"].get("train"),
                   "dpo_pairs": c["train"].get("dpo", {}).get("pairs"), "dpo_steps": c["train"].get("dpo", {}).get("steps"),
                   "sft_steps": c["train"].get("steps")} for c in cycles],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, default=20, help="difficulty (digits) to reach")
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--budget", type=float, default=900.0, help="seconds per arm, after the shared warm start")
    parser.add_argument("--cycle-seconds", type=float, default=None,
                        help="fine-tune seconds per cycle in both arms (default: LoopConfig's SFT budget)")
    parser.add_argument("--dpo-seconds", type=float, default=None,
                        help="of those, the sft+dpo arm's DPO seconds (default: PreferenceConfig's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (see tiny()); the numbers mean nothing")
    parser.add_argument("--home", type=Path, default=Path("/tmp/arbor-bench-dpo"))
    parser.add_argument("--out", type=Path, default=RESULTS / "dpo.json")
    args = parser.parse_args()

    base = LoopConfig()
    base = replace(base, seed=args.seed, time_budget_s=args.budget,
                   select=replace(base.select, mode="label_free"),
                   report_difficulties=tuple(sorted(set(base.report_difficulties) | {args.target})))
    if args.tiny:
        base = tiny(base, args.target)
    cycle_s = args.cycle_seconds if args.cycle_seconds is not None else base.train.time_budget_s
    dpo_s = args.dpo_seconds if args.dpo_seconds is not None else base.preference.time_budget_s
    if not 0 < dpo_s < cycle_s:
        parser.error(f"--dpo-seconds must lie between 0 and the cycle's {cycle_s} s")

    # one warm start for both arms: the comparison starts from the same weights
    shutil.rmtree(args.home, ignore_errors=True)
    policy, warm_s = shared_warm_start(args.home / "warm", base, "addition")

    arms = {method: run_arm(method, arm_config(base, method, cycle_s, dpo_s), policy, args.home / method.replace("+", "-"),
                            args.target, args.accuracy)
            for method in ("sft", "sft+dpo")}
    sft, dpo = arms["sft"]["seconds_to_target"], arms["sft+dpo"]["seconds_to_target"]
    summary = {
        "benchmark": "dpo",
        "task": "addition",
        "mode": "label_free",
        "tiny": args.tiny,
        "target_difficulty": args.target,
        "target_accuracy": args.accuracy,
        "budget_s": args.budget,
        "cycle_train_s": cycle_s,
        "dpo_s": dpo_s,
        "warm_start_s": round(warm_s, 1),
        "seconds_to_target": {m: a["seconds_to_target"] for m, a in arms.items()},
        # sft+dpo over sft; below 1: faster with DPO
        "time_to_target_ratio": round(dpo / sft, 3) if sft and dpo else None,
        "arms": arms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
