"""Headline benchmark: easy-to-hard self-improvement on the built-in addition task, in one process.

From a built-in policy warm-started only on 1-4 digit addition, how long until greedy accuracy on held-out
20-digit problems reaches 90%? Label-free (no ground truth after the warm start; answers are read only to
report accuracy and pseudo-label precision), then with the verifier selecting training data.
The baseline in the same run is the warm-started policy itself (cycle 0).

    python -m bench.selfimprove --mode label_free --budget 1800     # ~30 min on a 2-core CPU
    python -m bench.selfimprove --mode verifier --budget 1800

Prints one JSON object (last line) and writes bench/results/selfimprove-<mode>.json plus the run's
report.md and learning_curve.png under the run folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from agent.loop import LoopConfig, WarmStartConfig
from agent.runner import RunInputs, run_main
from agent.select import SelectConfig
from agent.settings import Settings

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["label_free", "verifier"], default="label_free")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds, warm start included")
    parser.add_argument("--target", type=int, default=20, help="difficulty (digits) to reach")
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--warm-start", type=float, default=180.0, help="warm-start seconds")
    parser.add_argument("--train-seconds", type=float, default=50.0)
    parser.add_argument("--home", type=Path, default=Path("/tmp/arbor-bench-selfimprove"))
    args = parser.parse_args()

    home = args.home / args.mode
    shutil.rmtree(home, ignore_errors=True)  # a fresh policy every time: the warm start is part of the clock
    base = LoopConfig()
    cfg = replace(
        base,
        cycles=1000,
        time_budget_s=args.budget,
        stop_when={"difficulty": args.target, "accuracy": args.accuracy},
        report_difficulties=(4, 6, 8, 12, 16, 20, 24),
        select=SelectConfig(mode=args.mode),
        train=replace(base.train, time_budget_s=args.train_seconds),
        warm_start=WarmStartConfig(train=replace(base.warm_start.train, time_budget_s=args.warm_start)),
    )

    def on_event(kind, payload):
        if kind == "cycle":
            r = payload
            shown = {k: round(v, 3) for k, v in r.heldout.items() if k in {"4", "8", "12", "16", "20", "24", str(r.frontier)}}
            filters = " ".join(f"{f['name']}={f['kept_fraction']:.2f}/{f['precision'] if f['precision'] is None else round(f['precision'], 3)}" for f in r.filters)
            print(f"[{r.elapsed_s:7.1f}s] cycle {r.cycle} {r.policy_version} frontier={r.frontier} promoted={r.promoted} "
                  f"accepted={r.accepted} acc={shown} {filters} t={r.seconds}", flush=True)
        else:
            print(f"[{kind}] {payload}", flush=True)

    start = time.monotonic()
    report = run_main(Settings(home=home, device="cpu"), cfg, RunInputs(run_name=f"bench-{args.mode}"), on_event)
    wall = time.monotonic() - start
    cycles = report["cycles"]
    target = str(args.target)
    reached = next((c for c in cycles if c["heldout"].get(target, 0.0) >= args.accuracy), None)
    summary = {
        "benchmark": "selfimprove",
        "mode": args.mode,
        "target_difficulty": args.target,
        "target_accuracy": args.accuracy,
        "baseline_warm_start_accuracy_at_target": cycles[0]["heldout"].get(target),
        "final_accuracy_at_target": cycles[-1]["heldout"].get(target),
        "reached": reached is not None,
        "seconds_to_target": reached["elapsed_s"] if reached else None,
        "budget_s": args.budget,
        "wall_s": round(wall, 1),
        "cycles_run": len(cycles) - 1,
        "promotions": sum(c["promoted"] for c in cycles),
        "curve": [{"cycle": c["cycle"], "elapsed_s": c["elapsed_s"], "frontier": c["frontier"], "promoted": c["promoted"],
                   "heldout": c["heldout"], "filters": c["filters"], "accepted": c["accepted"], "seconds": c["seconds"]}
                  for c in cycles],
        "run_dir": report["run_dir"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"selfimprove-{args.mode}.json").write_text(json.dumps(summary, indent=2))
    shutil.copy(Path(report["run_dir"]) / "learning_curve.png", RESULTS / f"selfimprove-{args.mode}.png")
    shutil.copy(Path(report["run_dir"]) / "report.md", RESULTS / f"selfimprove-{args.mode}.md")
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}))


if __name__ == "__main__":
    main()
