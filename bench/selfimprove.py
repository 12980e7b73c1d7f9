"""Headline benchmark: easy-to-hard self-improvement on a built-in task, in one process, one run per seed.

From a built-in policy warm-started only on short problems (1-4 digits or letters), how long until greedy
accuracy on held-out problems of the target difficulty reaches 90%? Every setting is `arbor run`'s default;
the benchmark only adds a stop once the target is reached (the run would go on learning longer lengths) and a
time budget. Label-free by default: no ground truth after the warm start; answers are read only to report
accuracy and pseudo-label precision. The baseline in the same run is the warm-started policy itself (cycle 0).

    python -m bench.selfimprove --seeds 0 1 2                          # addition, 40 digits (~25 min a seed)
    python -m bench.selfimprove --task reversal --target 8 --seeds 0    # reversal, twice the warm-start length
    python -m bench.selfimprove --mode verifier --target 20 --seeds 0

Prints one JSON object (last line) and writes bench/results/selfimprove-<task>-<mode>.json plus each seed's
report (.md) and learning curve (.png) beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from agent.loop import LoopConfig
from agent.runner import RunInputs, run_main
from agent.settings import Settings

RESULTS = Path(__file__).parent / "results"


def run_seed(task: str, mode: str, seed: int, target: int, accuracy: float, budget: float, home: Path) -> dict:
    shutil.rmtree(home, ignore_errors=True)  # a fresh policy every time: the warm start is part of the clock
    base = LoopConfig()
    cfg = replace(base, seed=seed, time_budget_s=budget, stop_when={"difficulty": target, "accuracy": accuracy},
                  select=replace(base.select, mode=mode),
                  report_difficulties=tuple(sorted(set(base.report_difficulties) | {target})))

    def on_event(kind, payload):
        if kind == "cycle":
            r = payload
            shown = {k: round(v, 2) for k, v in r.heldout.items() if int(k) % 4 == 0 or k in {str(target), str(r.frontier)}}
            filters = " ".join(f"{f['name']}={f['kept_fraction']:.2f}/{f['precision'] if f['precision'] is None else round(f['precision'], 3)}"
                               for f in r.filters)
            print(f"[seed {seed} {r.elapsed_s:7.1f}s] cycle {r.cycle} {r.policy_version} frontier={r.frontier} promoted={r.promoted} "
                  f"accepted={r.accepted} acc={shown} {filters} t={r.seconds}", flush=True)
        else:
            print(f"[seed {seed} {kind}] {payload}", flush=True)

    start = time.monotonic()
    report = run_main(Settings(home=home, device="cpu"), cfg, RunInputs(run_name=f"bench-{task}-{mode}-s{seed}", task=task),
                      on_event)
    cycles = report["cycles"]
    reached = next((c for c in cycles if c["heldout"].get(str(target), 0.0) >= accuracy), None)
    stem = f"selfimprove-{task}-{mode}-s{seed}"
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(Path(report["run_dir"]) / "learning_curve.png", RESULTS / f"{stem}.png")
    shutil.copy(Path(report["run_dir"]) / "report.md", RESULTS / f"{stem}.md")
    return {
        "seed": seed,
        "baseline_warm_start_accuracy_at_target": cycles[0]["heldout"].get(str(target)),
        "final_accuracy_at_target": cycles[-1]["heldout"].get(str(target)),
        "reached": reached is not None,
        "seconds_to_target": reached["elapsed_s"] if reached else None,
        "cycles_run": len(cycles) - 1,
        "promotions": sum(c["promoted"] for c in cycles),
        "wall_s": round(time.monotonic() - start, 1),
        "curve": [{"cycle": c["cycle"], "elapsed_s": c["elapsed_s"], "frontier": c["frontier"], "promoted": c["promoted"],
                   "heldout": c["heldout"], "filters": c["filters"], "accepted": c["accepted"], "seconds": c["seconds"]}
                  for c in cycles],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="addition", help="a built-in task family")
    parser.add_argument("--mode", choices=["label_free", "verifier"], default="label_free")
    parser.add_argument("--target", type=int, default=40, help="difficulty (digits, letters) to reach")
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds per seed, warm start included")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--home", type=Path, default=Path("/tmp/arbor-bench-selfimprove"))
    args = parser.parse_args()

    runs = [run_seed(args.task, args.mode, seed, args.target, args.accuracy, args.budget, args.home / f"{args.task}-{args.mode}-s{seed}")
            for seed in args.seeds]
    times = [r["seconds_to_target"] for r in runs]
    summary = {
        "benchmark": "selfimprove",
        "task": args.task,
        "mode": args.mode,
        "target_difficulty": args.target,
        "target_accuracy": args.accuracy,
        "budget_s": args.budget,
        "all_reached": all(r["reached"] for r in runs),
        "seconds_to_target": times,
        "slowest_s": max(times) if all(t is not None for t in times) else None,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"selfimprove-{args.task}-{args.mode}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}
                     | {"per_seed": [{k: v for k, v in r.items() if k != "curve"} for r in runs]}))


if __name__ == "__main__":
    main()
