"""Headline benchmark: easy-to-hard self-improvement on a built-in task, in one process, one run per seed.

From a built-in policy warm-started only on short problems (1-4 digits or letters), how long until greedy
accuracy on held-out problems of the target difficulty reaches 90%? Every setting is `arbor run`'s default;
the benchmark only adds a stop once the target is reached (the run would go on learning longer lengths) and a
time budget. Label-free by default: no ground truth after the warm start; answers are read only to report
accuracy and pseudo-label precision. The baseline in the same run is the warm-started policy itself (cycle 0).

    python -m bench.selfimprove --seeds 0 1 2                          # addition, 40 digits (~25 min a seed)
    python -m bench.selfimprove --task reversal --target 8 --seeds 0    # reversal, twice the warm-start length
    python -m bench.selfimprove --mode verifier --target 20 --seeds 0
    python -m bench.selfimprove --sources --target 8 --budget 420 --seeds 0   # the data-source comparison
    python -m bench.selfimprove --value-model both --seeds 0 1 2       # each seed without, then with a value model
    python -m bench.selfimprove --schedule both --seeds 0 1 2          # each cycle's fine-tune: constant rate, then cosine

`--sources` compares the loop's data sources (the search that finds each cycle's trajectories, DATA_SOURCES):
best-of-4, beam, diverse beam and MCTS, each sized to generate about as many tokens per problem. All arms of a
seed start from one shared warm start (its seconds are reported apart, not in the arms' clocks), and every
cycle records the tokens its search generated (`search_tokens`), so the comparison shows what each arm spent.
`--value-model both` also starts both arms of a seed from one shared warm start, whose seconds count in each
arm's time to the target (`value_comparison`), beside the seconds the judge itself took (`judge_s`).
`--schedule both` does the same for each cycle's learning-rate schedule (`schedule_comparison`): the default
constant rate against warm-up and cosine decay over the fine-tune's time budget (`TrainConfig.schedule`).

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

from agent.config import LoopConfig

from agent.warm_start import ensure_policy
from agent.registry import PolicyRegistry
from agent.runner import RunInputs, run_main
from agent.settings import Settings
from agent.store import Store
from bench.confirm_target import confirm
from search import SearchConfig
from tasks import get_task

RESULTS = Path(__file__).parent / "results"

# Data sources sized for about equal generated tokens per problem (an answer of L tokens): best-of-4 samples 4L;
# beam and diverse beam keep 4 beams (4 tokens a step). MCTS with 2 children and 2 simulations was sized as 2L + 2L,
# but merged identical children and shorter second rollouts made it 0.54x (reversal) and 0.62x (addition) of
# best-of-4's tokens; diverse beam measured 1.1-1.3x, beam 1.0x. Each cycle's `search_tokens` shows it.
DATA_SOURCES = {
    "best_of_n": SearchConfig(strategy="best_of_n", n=4, temperature=1.0),
    "beam": SearchConfig(strategy="beam", beams=4),
    "diverse_beam": SearchConfig(strategy="diverse_beam", beams=4, groups=2, diversity_penalty=1.0),
    "mcts": SearchConfig(strategy="mcts", children=2, simulations=2, temperature=1.0),
}


def format_filters(filters: list[dict]) -> str:
    """A cycle's label filters as `name=kept fraction/precision` for a progress line."""
    return " ".join(f"{f['name']}={f['kept_fraction']:.2f}/{f['precision'] if f['precision'] is None else round(f['precision'], 3)}"
                    for f in filters)


def bench_config(mode: str, seed: int, target: int, accuracy: float, budget: float, source: str | None = None,
                 schedule: str | None = None) -> LoopConfig:
    """`arbor run`'s defaults plus the benchmark's stop at the target, its budget and (optionally) a data source and
    each cycle's learning-rate schedule."""
    base = LoopConfig()
    return replace(base, seed=seed, time_budget_s=budget,
                   select=replace(base.select, mode=mode), search=DATA_SOURCES[source] if source else base.search,
                   train=replace(base.train, schedule=schedule) if schedule else base.train,
                   report_difficulties=tuple(sorted(set(base.report_difficulties) | {target})))


def target_reached(target: int, accuracy: float):
    """The benchmark's stop: the run ends once the target difficulty's held-out accuracy reaches `accuracy`."""
    return lambda record: record.heldout.get(str(target), 0.0) >= accuracy


def shared_warm_start(home: Path, cfg: LoopConfig, task: str) -> tuple[Path, float]:
    """One warm-started built-in policy for several arms (the folder an arm adopts as `arbor run --model` would),
    and the seconds it took: arms compared from it start from the same weights."""
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=home, device="cpu")
    store = Store(settings.db_url)
    registry = PolicyRegistry(settings.policies_dir, store)
    t = time.monotonic()
    version = ensure_policy(settings, registry, cfg, task=get_task(task))
    return Path({r.version: r.path for r in store.policies()}[version]), time.monotonic() - t


def run_seed(task: str, mode: str, seed: int, target: int, accuracy: float, budget: float, home: Path,
             source: str | None = None, policy: Path | None = None, value_model: bool = False,
             schedule: str | None = None) -> dict:
    """One run; from a fresh policy (its warm start in the clock) unless `policy` (a shared warm start) is given.
    `value_model`: the run trains a value model with every promoted candidate (`arbor run --value-model`);
    `schedule`: each cycle's learning-rate schedule (unset: the default)."""
    shutil.rmtree(home, ignore_errors=True)
    cfg = replace(bench_config(mode, seed, target, accuracy, budget, source, schedule), value_model=value_model)

    def on_event(kind, payload):
        if kind == "cycle":
            r = payload
            shown = {k: round(v, 2) for k, v in r.heldout.items() if int(k) % 4 == 0 or k in {str(target), str(r.frontier)}}
            filters = format_filters(r.filters)
            print(f"[seed {seed}{' ' + source if source else ''} {r.elapsed_s:7.1f}s] cycle {r.cycle} {r.policy_version} frontier={r.frontier} promoted={r.promoted} "
                  f"accepted={r.accepted} acc={shown} {filters} t={r.seconds}", flush=True)
        else:
            print(f"[seed {seed}{' ' + source if source else ''} {kind}] {payload}", flush=True)

    start = time.monotonic()
    report = run_main(Settings(home=home, device="cpu"), cfg,
                      RunInputs(model=policy, run_name=f"bench-{task}-{mode}-s{seed}", task=task), on_event,
                      target_reached(target, accuracy))
    cycles = report["cycles"]
    reached = next((c for c in cycles if c["heldout"].get(str(target), 0.0) >= accuracy), None)
    stem = (f"selfimprove-{task}-{mode}" + (f"-{source}" if source else "") + ("-value" if value_model else "")
            + (f"-{schedule}" if schedule else "") + f"-s{seed}")
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(Path(report["run_dir"]) / "learning_curve.png", RESULTS / f"{stem}.png")
    shutil.copy(Path(report["run_dir"]) / "report.md", RESULTS / f"{stem}.md")
    confirmed = confirm(home, cycles[-1]["policy_version"], task, target)
    return {
        "seed": seed,
        "source": source or "best_of_n",
        "value_model": value_model,
        "schedule": cfg.train.schedule,
        "baseline_warm_start_accuracy_at_target": cycles[0]["heldout"].get(str(target)),
        "final_accuracy_at_target": cycles[-1]["heldout"].get(str(target)),
        # the last policy on 200 fresh held-out problems at the target (the loop may have read it from 25)
        "confirmed_accuracy_at_target": confirmed["accuracy"],
        "reached": reached is not None,
        "seconds_to_target": reached["elapsed_s"] if reached else None,
        "cycles_run": len(cycles) - 1,
        "search_tokens": sum(c.get("search_tokens", 0) for c in cycles),
        "promotions": sum(c["promoted"] for c in cycles),
        "wall_s": round(time.monotonic() - start, 1),
        "curve": [{"cycle": c["cycle"], "elapsed_s": c["elapsed_s"], "frontier": c["frontier"], "promoted": c["promoted"],
                   "heldout": c["heldout"], "filters": c["filters"], "accepted": c["accepted"], "seconds": c["seconds"],
                   "search_tokens": c.get("search_tokens", 0), **({"value": c["value"]} if c.get("value") else {})}
                  for c in cycles],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="addition", help="a built-in task family")
    parser.add_argument("--mode", choices=["label_free", "verifier"], default="label_free")
    parser.add_argument("--target", type=int, default=40, help="difficulty (digits, letters) to reach")
    parser.add_argument("--accuracy", type=float, default=0.9)
    parser.add_argument("--budget", type=float, default=1800.0,
                        help="seconds per run, warm start included (with --sources: after the shared warm start)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="*", choices=sorted(DATA_SOURCES), default=None,
                        help="compare these data sources (no names: all of them) from one warm start per seed")
    parser.add_argument("--policy", type=Path, default=None,
                        help="with --sources and one seed: start every arm from this warm-started policy folder instead of "
                             "a new warm start; runs of other sources already recorded from the same folder are kept")
    parser.add_argument("--value-model", choices=["off", "on", "both"], default="off",
                        help="train a value model in the loop: off, on, or both (each seed without, then with, from one warm "
                             "start)")
    parser.add_argument("--schedule", choices=["default", "time_cosine", "both"], default="default",
                        help="each cycle's learning-rate schedule: the default (constant), time_cosine, or both (each seed "
                             "constant, then cosine, from one warm start)")
    parser.add_argument("--home", type=Path, default=Path("/tmp/arbor-bench-selfimprove"))
    args = parser.parse_args()
    if args.policy is not None and (args.sources is None or len(args.seeds) != 1):
        parser.error("--policy goes with --sources and a single seed")
    if (args.value_model != "off" or args.schedule != "default") and args.sources is not None:
        parser.error("--value-model and --schedule compare runs of the default data source: leave out --sources")
    if args.value_model == "both" and args.schedule == "both":
        parser.error("compare one thing at a time: --value-model both or --schedule both")

    stem = (f"selfimprove-{args.task}-{args.mode}" + ("-sources" if args.sources is not None else "")
            + {"off": "", "on": "-value", "both": "-value-vs-none"}[args.value_model]
            + {"default": "", "time_cosine": "-time_cosine", "both": "-schedules"}[args.schedule])
    runs, warm_seconds = [], {}
    earlier = RESULTS / f"{stem}.json"
    if args.policy is not None and earlier.exists():  # arms measured before from the same warm start stay in the summary
        kept = json.loads(earlier.read_text())
        if kept.get("policy") == str(args.policy.resolve()):
            runs = [r for r in kept["runs"] if r["source"] not in (args.sources or list(DATA_SOURCES))]
            warm_seconds = {int(k): v for k, v in kept.get("shared_warm_start_s", {}).items()}

    def seed_warm_start(seed: int) -> Path:
        """One warm start for all of a seed's arms; its seconds are kept in warm_seconds."""
        warm_cfg = bench_config(args.mode, seed, args.target, args.accuracy, args.budget)
        folder, warm_seconds[seed] = shared_warm_start(args.home / f"{args.task}-warm-s{seed}", warm_cfg, args.task)
        return folder

    for seed in args.seeds:  # the summary is rewritten after every run: a stopped benchmark keeps what it finished
        if args.sources is None:
            # a comparison's arms start from one warm start, so its spread is not the compared setting's
            shared = seed_warm_start(seed) if "both" in (args.value_model, args.schedule) else None
            for value_model in {"off": [False], "on": [True], "both": [False, True]}[args.value_model]:
                for schedule in {"default": [None], "time_cosine": ["time_cosine"],
                                 "both": [None, "time_cosine"]}[args.schedule]:
                    home = args.home / (f"{args.task}-{args.mode}-s{seed}" + ("-value" if value_model else "")
                                        + (f"-{schedule}" if schedule else ""))
                    runs.append(run_seed(args.task, args.mode, seed, args.target, args.accuracy, args.budget, home,
                                         policy=shared, value_model=value_model, schedule=schedule))
                    RESULTS.mkdir(exist_ok=True)
                    (RESULTS / f"{stem}.json").write_text(json.dumps(summarize(args, runs, warm_seconds), indent=2))
        else:
            policy = seed_warm_start(seed) if args.policy is None else args.policy
            for source in args.sources or list(DATA_SOURCES):
                runs.append(run_seed(args.task, args.mode, seed, args.target, args.accuracy, args.budget,
                                     args.home / f"{args.task}-{args.mode}-{source}-s{seed}", source, policy))
                summary = summarize(args, runs, warm_seconds, policy)
                (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2))
        summary = summarize(args, runs, warm_seconds, policy if args.sources is not None else None)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}
                     | {"per_run": [{k: v for k, v in r.items() if k != "curve"} for r in runs]}))


def summarize(args, runs: list[dict], warm_seconds: dict, policy: Path | None = None) -> dict:
    times = [r["seconds_to_target"] for r in runs]
    summary = {
        "benchmark": "selfimprove",
        "task": args.task,
        "mode": args.mode,
        "target_difficulty": args.target,
        "target_accuracy": args.accuracy,
        "budget_s": args.budget,
        "seeds": sorted({r["seed"] for r in runs}),
        "all_reached": all(r["reached"] for r in runs),
        "seconds_to_target": times,
        "slowest_s": max(times) if all(t is not None for t in times) else None,
        "runs": runs,
    }
    if args.sources is not None:  # per source: time to the target after the shared warm start, and tokens per cycle
        summary["policy"] = str(policy.resolve())  # the shared warm start every arm began from
        summary["shared_warm_start_s"] = {str(k): round(v, 1) for k, v in warm_seconds.items()}
        summary["sources"] = [
            {"source": r["source"], "seed": r["seed"], "seconds_to_target": r["seconds_to_target"], "cycles_run": r["cycles_run"],
             "final_accuracy_at_target": r["final_accuracy_at_target"],
             "search_tokens_per_cycle": round(r["search_tokens"] / max(1, r["cycles_run"]))}
            for r in runs]
    if args.value_model == "both":  # one table: each seed's time to the target without and with the value model
        summary["shared_warm_start_s"] = {str(k): round(v, 1) for k, v in warm_seconds.items()}
        summary["value_comparison"] = arm_comparison(runs, warm_seconds, lambda r: "with" if r["value_model"] else "without")
    if args.schedule == "both":  # each seed's time to the target at a constant rate and on the cosine schedule
        summary["shared_warm_start_s"] = {str(k): round(v, 1) for k, v in warm_seconds.items()}
        summary["schedule_comparison"] = arm_comparison(runs, warm_seconds, lambda r: r["schedule"])
    return summary


def arm_comparison(runs: list[dict], warm_seconds: dict, arm_of) -> list[dict]:
    """Per seed, each arm's time to the target as `<arm>_s`: the arms adopt the seed's shared warm start, whose
    seconds count in each arm's time. An arm with a value model also gives the seconds its judge took (`judge_s`: to
    the target, or in all where it was not reached)."""
    by_seed: dict[int, dict] = {}
    for r in runs:
        arm = r["seconds_to_target"]
        row = by_seed.setdefault(r["seed"], {"seed": r["seed"]})
        row[f"{arm_of(r)}_s"] = round(warm_seconds.get(r["seed"], 0.0) + arm, 1) if arm is not None else None
        if r["value_model"]:
            row["judge_s"] = round(sum(c["seconds"].get("value", 0.0) for c in r["curve"]
                                       if arm is None or c["elapsed_s"] <= arm), 1)
    return [row for _, row in sorted(by_seed.items())]

if __name__ == "__main__":
    main()
