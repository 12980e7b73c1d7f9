"""Continue a bench.selfimprove run past the target it stopped at: the same run, resumed (`arbor run --resume`),
until a longer target's held-out accuracy reaches the bar or the run's budget ends.

A benchmark run stops once it reaches its target; the run itself would have gone on learning longer lengths. This
resumes it with its own settings, policy, replay buffer and clock (a resumed run's clock counts its recorded
cycles, not the time in between), so the seconds it reports are those of one uninterrupted run.

    python -m bench.continue_run /tmp/arbor-sched/addition-label_free-s0-time_cosine bench-addition-label_free-s0 \\
        --target 100 --budget 1614 --name addition-label_free-time_cosine-to100-s0

`--budget` is the run's time budget, which a resume may change: an arm that adopted a shared warm start of W
seconds gets 1800 - W to stay within the headline's 1800 s. `--setting KEY=JSON` changes a loop setting for the
rest of the run, which `arbor run --resume` refuses (a resumed run keeps how it learns): it is for comparing one
setting from one recorded state, each arm on its own copy of the home:

    cp -a HOME /tmp/arm-a && cp -a HOME /tmp/arm-b
    python -m bench.continue_run /tmp/arm-b RUN --budget 2400 --setting full_heldout_ahead=3 --name ... Prints one JSON object (last line) and copies the run's
report, learning curve and time plot to bench/results/selfimprove-<name>.md/.png/-time.png beside its .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path

from agent.config import LoopConfig
from agent.run_store import RunStore
from agent.runner import RunInputs, run_main
from agent.settings import Settings
from agent.store import Store
from bench.confirm_target import confirm, run_arguments

RESULTS = Path(__file__).parent / "results"


def change_settings(home: Path, run: str, values: dict[str, str]) -> None:
    """Write new values of LoopConfig fields into the stored run's settings (JSON values, e.g. 3 or null)."""
    store = RunStore(Store(Settings(home=home, device="cpu").db_url))
    row = store.get(run)
    known = {f.name for f in fields(LoopConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"not a loop setting: {', '.join(unknown)}")
    store.set_config(run, {**row.config, **{k: json.loads(v) for k, v in values.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser)
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--budget", type=float, default=None, help="the run's new time budget in seconds")
    parser.add_argument("--name", required=True, help="the result files are bench/results/selfimprove-<name>.*")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=JSON",
                        help="a LoopConfig field to change for the rest of the run (an A/B from one recorded state)")
    args = parser.parse_args()
    if args.setting:
        change_settings(args.home, args.run, dict(s.split("=", 1) for s in args.setting))

    def on_event(kind, r):
        if kind != "cycle":
            print(f"[{kind}] {r}", flush=True)
            return
        shown = {k: round(v, 2) for k, v in r.heldout.items() if int(k) % 20 == 0 or k == str(r.frontier)}
        print(f"[{r.elapsed_s:7.1f}s] cycle {r.cycle} {r.policy_version} frontier={r.frontier} promoted={r.promoted} "
              f"accepted={r.accepted} acc={shown} t={ {k: round(v, 1) for k, v in r.seconds.items()} }", flush=True)

    target = str(args.target)
    changes = {"time_budget_s": args.budget} if args.budget is not None else {}
    report = run_main(Settings(home=args.home, device="cpu"), LoopConfig(), RunInputs(resume=args.run, changes=changes),
                      on_event, lambda record: record.heldout.get(target, 0.0) >= args.accuracy)
    cycles = report["cycles"]
    reached = next((c for c in cycles if c["heldout"].get(target, 0.0) >= args.accuracy), None)
    stem = f"selfimprove-{args.name}"
    run_dir = Path(report["run_dir"])
    RESULTS.mkdir(exist_ok=True)
    for source, suffix in (("report.md", ".md"), ("learning_curve.png", ".png"), ("time_per_cycle.png", "-time.png")):
        shutil.copy(run_dir / source, RESULTS / f"{stem}{suffix}")
    summary = {
        "benchmark": "continue_run",
        "run": args.run,
        "target_difficulty": args.target,
        "target_accuracy": args.accuracy,
        "reached": reached is not None,
        "seconds_to_target": reached["elapsed_s"] if reached else None,
        "final_accuracy_at_target": cycles[-1]["heldout"].get(target),
        "confirmed_accuracy_at_target": confirm(args.home, cycles[-1]["policy_version"], "addition", args.target)[
            "accuracy"],
        "settings_changed": args.setting,
        "cycles": [{"cycle": c["cycle"], "elapsed_s": c["elapsed_s"], "frontier": c["frontier"],
                    "heldout": {k: c["heldout"].get(k) for k in ("40", "60", "80", target)}, "seconds": c["seconds"]}
                   for c in cycles],
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "cycles"}))


if __name__ == "__main__":
    main()
