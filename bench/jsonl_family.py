"""A task given only as JSONL files, as a new user would bring one: no plugin, no generator, no label checks.

The family (built here for the benchmark, neither addition nor reversal): *mirror letters*, each letter replaced
by its mirror in the alphabet (a<->z, b<->y, ...), prompt "word|", answer the mirrored word. The files hold
1,500 demonstrations of 1-4 letters, and 1,500 train and 300 held-out problems of 2-8 letters with answers,
difficulty in `meta` only. Two arms of `arbor run --demos --problems`, each from a fresh built-in policy:

  answers     the default: every train problem carries an answer, so the run selects with them (verifier mode,
              and a problem none of whose candidates verified trains on its own answer);
  label_free  `--select label_free`: the answers are read only to report each filter's precision.

The baseline in the same run is the warm-started policy (cycle 0). Every promoted version is re-evaluated
greedily on all 300 held-out problems, so each arm's curve is over the same problems at every cycle.

    python -m bench.jsonl_family                       # both arms, 540 s each (warm start included)
    python -m bench.jsonl_family --arms label_free --budget 300

Prints one JSON object (last line) and writes bench/results/jsonl-family.json and a plot of both curves.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import string
from dataclasses import replace
from pathlib import Path

from agent.config import LoopConfig

from agent.evaluation import evaluate_policy
from agent.registry import PolicyRegistry
from agent.runner import RunInputs, run_main
from agent.settings import Settings
from agent.store import Store
from bench.selfimprove import format_filters
from tasks.jsonl import read_problems

RESULTS = Path(__file__).parent / "results"
MIRROR = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[::-1])


def mirror_record(word: str, split: str | None) -> dict:
    record = {"prompt": f"{word}|", "answer": word.translate(MIRROR), "meta": {"difficulty": len(word)}}
    if split:
        record["split"] = split
    return record


def write_family(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """demos.jsonl (1,500 demonstrations, 1-4 letters) and problems.jsonl (1,500 train, 300 held-out, 2-8 letters)."""
    rng = random.Random(f"mirror/{seed}")
    word = lambda n: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    demos, problems = folder / "demos.jsonl", folder / "problems.jsonl"
    with demos.open("w") as f:
        for i in range(1500):
            w = word(1 + i % 4)
            f.write(json.dumps({"prompt": f"{w}|", "completion": w.translate(MIRROR)}) + "\n")
    seen: set[str] = set()  # every problem's word is distinct, so held-out words never appear among train ones
    with problems.open("w") as f:
        for split, n in (("heldout", 300), ("train", 1500)):
            written = 0
            while written < n:
                w = word(2 + written % 7)
                if w in seen:  # a problem written twice would share its content id
                    continue
                seen.add(w)
                f.write(json.dumps(mirror_record(w, split)) + "\n")
                written += 1
    return demos, problems


def heldout_curve(home: Path, report: dict, problems_path: Path) -> list[dict]:
    """Greedy accuracy of each cycle's policy on all held-out problems (and per length)."""
    problems, _ = read_problems(problems_path)
    by_length: dict[str, list] = {}
    for p in problems:
        if p.split == "heldout":
            by_length.setdefault(str(p.meta["difficulty"]), []).append(p)
    settings = Settings(home=home, device="cpu")
    registry = PolicyRegistry(settings.policies_dir, Store(settings.db_url))
    cfg = LoopConfig().eval_search
    scored: dict[str, dict] = {}
    curve = []
    for c in report["cycles"]:
        version = c["policy_version"]
        if version not in scored:
            evaluation = evaluate_policy(registry.load(version, "cpu"), by_length, replace(cfg, max_new_tokens=16))
            scored[version] = evaluation.accuracy
        acc = scored[version]
        n = {k: len(v) for k, v in by_length.items()}
        overall = sum(acc.get(k, 0.0) * n[k] for k in n) / sum(n.values())
        curve.append({"cycle": c["cycle"], "elapsed_s": c["elapsed_s"], "policy": version, "heldout_all": round(overall, 3),
                      "by_length": {k: round(acc.get(k, 0.0), 2) for k in sorted(n, key=int)},
                      "accepted": c["accepted"], "filters": c["filters"]})
    return curve


def run_arm(arm: str, demos: Path, problems: Path, home: Path, budget: float, seed: int) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    base = LoopConfig()
    cfg = replace(base, seed=seed, time_budget_s=budget)
    if arm == "label_free":
        cfg = replace(cfg, select=replace(base.select, mode="label_free"))
    inputs = RunInputs(demos=demos, problems=problems, run_name=f"jsonl-{arm}", select_given=arm == "label_free")
    phases: list[str] = []

    def on_event(kind, payload):
        if kind == "cycle":
            r = payload
            filters = format_filters(r.filters)
            print(f"[{arm} {r.elapsed_s:6.1f}s] cycle {r.cycle} {r.policy_version} frontier={r.frontier} promoted={r.promoted} "
                  f"accepted={r.accepted} acc={ {k: round(v, 2) for k, v in r.heldout.items()} } {filters}", flush=True)
        else:
            phases.append(str(payload))
            print(f"[{arm} {kind}] {payload}", flush=True)

    report = run_main(Settings(home=home, device="cpu"), cfg, inputs, on_event)
    curve = heldout_curve(home, report, problems)
    return {"arm": arm, "mode": report["config"]["select"]["mode"], "phases": phases,
            "warm_start_heldout": curve[0]["heldout_all"], "final_heldout": curve[-1]["heldout_all"],
            "best_heldout": max(c["heldout_all"] for c in curve),
            "lift": round(curve[-1]["heldout_all"] - curve[0]["heldout_all"], 3),
            "cycles_run": len(curve) - 1, "curve": curve}


def plot(arms: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arms:
        ax.plot([c["elapsed_s"] for c in a["curve"]], [c["heldout_all"] for c in a["curve"]], marker="o", label=f"{a['arm']} ({a['mode']})")
    ax.set_xlabel("seconds (warm start included)")
    ax.set_ylabel("held-out greedy accuracy (300 problems, 2-8 letters)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("A JSONL-only task (mirror letters): answers vs label-free")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=["answers", "label_free"], default=["answers", "label_free"])
    parser.add_argument("--budget", type=float, default=540.0, help="seconds per arm, warm start included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=Path("/tmp/arbor-bench-jsonl"))
    parser.add_argument("--out", type=Path, default=RESULTS / "jsonl-family.json")
    args = parser.parse_args()

    demos, problems = write_family(args.home / "files", args.seed)
    arms = [run_arm(arm, demos, problems, args.home / arm, args.budget, args.seed) for arm in args.arms]
    summary = {"benchmark": "jsonl_family", "family": "mirror letters", "budget_s": args.budget,
               "arms": {a["arm"]: {k: v for k, v in a.items() if k not in ("curve", "arm")} for a in arms}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**summary, "curves": {a["arm"]: a["curve"] for a in arms}}, indent=2))
    plot(arms, args.out.with_suffix(".png"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
