"""A task given only as JSONL files, as a new user would bring one: no plugin, no generator, no label checks.

Families built here for the benchmark (neither addition nor reversal), prompt "word|":

  mirror   each letter replaced by its mirror in the alphabet (a<->z, b<->y, ...): 1,500 demonstrations of 1-4
           letters, 1,500 train and 300 held-out problems of 2-8 letters. Each answer letter comes from the prompt
           letter at the same place, so the new policy couples their positions (tasks/alignment.py).
  rotate   the word rotated left by one letter ("abcde" -> "bcdea"): demonstrations of 2-5 letters, problems of
           2-10. No answer letter sits at its source letter's place, so the policy numbers tokens in sequence and
           has to learn each length's distance from examples of it: past the demonstrations only the problems'
           answers teach it.
  rotate-distinct  the same on words that never repeat a letter: the letter to write next is always the one after
           the letter just written, which a word like "abca" leaves ambiguous.
  sort     the word's letters in alphabetical order ("banana" -> "aaabnn"): demonstrations of 2-5 letters, problems
           of 2-10. Which letter comes next depends on the letters' values, not on where they stand, so positions
           are numbered in sequence here too.
  sort-distinct  the same on words that never repeat a letter (no letter counts to keep).
  double   each letter written twice ("abc" -> "aabbcc"): demonstrations of 2-5 letters, problems of 2-10. The
           answer is twice the word's length, so nothing couples positions: answer letter 2i and 2i+1 sit a
           length-dependent distance from prompt letter i, and the letter to write after a pair is the one after it
           in the word (ambiguous where a word repeats a letter).
  double-distinct  the same on words that never repeat a letter. A warm start on the demonstrations alone writes
           2-5 letters and none past 5 (0.06 at 6 letters, 0.00 at 7-10): longer words are learned from the
           problems' answers or not at all.

Problems carry answers and their difficulty in `meta` only. Two arms of `arbor run --demos --problems`, each from a
fresh built-in policy:

  answers     the default: every train problem carries an answer, so the run selects with them (verifier mode,
              and a problem none of whose candidates verified trains on its own answer);
  label_free  `--select label_free`: the answers are read only to report each filter's precision.
  value_filter  label-free with `--value-model --min-value 0.5`: a value model learned RankGen-style from the
              demonstrations (against the policy's own different answers to them) filters the labels too.

The baseline in the same run is the warm-started policy (cycle 0). Every promoted version is re-evaluated
greedily on all 300 held-out problems, so each arm's curve is over the same problems at every cycle.

    python -m bench.jsonl_family                       # mirror, both arms, 540 s each (warm start included)
    python -m bench.jsonl_family --family rotate --budget 1200
    python -m bench.jsonl_family --arms label_free --budget 300
    python -m bench.jsonl_family --arms label_free value_filter --out bench/results/jsonl-family-value.json
    python -m bench.jsonl_family --family sort --budget 1200 --arms answers --train-problems 4500
    python -m bench.jsonl_family --family double-distinct --budget 1200 --arms answers label_free

Prints one JSON object (last line) and writes bench/results/jsonl-family.json and a plot of both curves.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

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


@dataclass(frozen=True)
class Family:
    title: str
    answer: Callable[[str], str]
    demo_lengths: tuple[int, int]  # shortest and longest word of the demonstrations
    problem_lengths: tuple[int, int]  # ... of the train and held-out problems
    distinct_letters: bool = False  # words never repeat a letter


FAMILIES = {
    "mirror": Family("mirror letters", lambda w: w.translate(MIRROR), (1, 4), (2, 8)),
    "rotate": Family("rotate left by one", lambda w: w[1:] + w[:1], (2, 5), (2, 10)),
    "rotate-distinct": Family("rotate left by one, no letter twice", lambda w: w[1:] + w[:1], (2, 5), (2, 10), True),
    "sort": Family("letters sorted", lambda w: "".join(sorted(w)), (2, 5), (2, 10)),
    "sort-distinct": Family("letters sorted, no letter twice", lambda w: "".join(sorted(w)), (2, 5), (2, 10), True),
    "double": Family("each letter twice", lambda w: "".join(c + c for c in w), (2, 5), (2, 10)),
    "double-distinct": Family("each letter twice, no letter twice in a word", lambda w: "".join(c + c for c in w),
                              (2, 5), (2, 10), True),
}


def family_record(family: Family, word: str, split: str | None) -> dict:
    record = {"prompt": f"{word}|", "answer": family.answer(word), "meta": {"difficulty": len(word)}}
    if split:
        record["split"] = split
    return record


def write_family(folder: Path, seed: int = 0, name: str = "mirror", train: int = 1500) -> tuple[Path, Path]:
    """demos.jsonl (1,500 demonstrations) and problems.jsonl (`train` train, 300 held-out), every length of the
    family's ranges equally often."""
    family = FAMILIES[name]
    rng = random.Random(f"{name}/{seed}")

    def word(n: int) -> str:
        if family.distinct_letters:
            return "".join(rng.sample(string.ascii_lowercase, n))
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))

    folder.mkdir(parents=True, exist_ok=True)
    demos, problems = folder / "demos.jsonl", folder / "problems.jsonl"
    low, high = family.demo_lengths
    with demos.open("w") as f:
        for i in range(1500):
            w = word(low + i % (high - low + 1))
            f.write(json.dumps({"prompt": f"{w}|", "completion": family.answer(w)}) + "\n")
    seen: set[str] = set()  # every problem's word is distinct, so held-out words never appear among train ones
    low, high = family.problem_lengths
    per_length = -(-(300 + train) // (high - low + 1))
    words = math.perm(26, low) if family.distinct_letters else 26 ** low
    if per_length > words:
        raise SystemExit(f"--train-problems {train}: {per_length} distinct words of {low} letters needed, "
                         f"{words} exist; ask for fewer")
    with problems.open("w") as f:
        for split, n in (("heldout", 300), ("train", train)):
            written = 0
            while written < n:
                w = word(low + written % (high - low + 1))
                if w in seen:  # a problem written twice would share its content id
                    continue
                seen.add(w)
                f.write(json.dumps(family_record(family, w, split)) + "\n")
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
            policy = registry.load(version, "cpu")
            # room for the longest answer and its end token: a fixed 16 cut the double family's 9-10 letter answers
            room = max(len(policy.tokenizer(p.answer, add_special_tokens=False).input_ids)
                       for ps in by_length.values() for p in ps) + 2
            evaluation = evaluate_policy(policy, by_length, replace(cfg, max_new_tokens=room))
            scored[version] = evaluation.accuracy
        acc = scored[version]
        n = {k: len(v) for k, v in by_length.items()}
        overall = sum(acc.get(k, 0.0) * n[k] for k in n) / sum(n.values())
        curve.append({"cycle": c["cycle"], "elapsed_s": c["elapsed_s"], "policy": version, "heldout_all": round(overall, 3),
                      "by_length": {k: round(acc.get(k, 0.0), 2) for k in sorted(n, key=int)},
                      "accepted": c["accepted"], "filters": c["filters"], "seconds": c["seconds"],
                      **({"value": c["value"]} if c.get("value") else {})})
    return curve


def run_arm(arm: str, demos: Path, problems: Path, home: Path, budget: float, seed: int, min_value: float = 0.5,
            learning_rate: float | None = None) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    base = LoopConfig()
    cfg = replace(base, seed=seed, time_budget_s=budget)
    if learning_rate is not None:
        cfg = replace(cfg, train=replace(base.train, learning_rate=learning_rate))
    if arm in ("label_free", "value_filter"):
        cfg = replace(cfg, select=replace(base.select, mode="label_free"))
    if arm == "value_filter":
        cfg = replace(cfg, value_model=True, select=replace(cfg.select, min_value=min_value))
    inputs = RunInputs(demos=demos, problems=problems, run_name=f"jsonl-{arm}", select_given=arm != "answers")
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
    return arm_result(arm, report, phases, home, problems)


def arm_result(arm: str, report: dict, phases: list[str], home: Path, problems: Path) -> dict:
    """An arm's curve (every cycle's policy re-scored on all held-out problems) and its summary."""
    curve = heldout_curve(home, report, problems)
    longest = max(curve[0]["by_length"], key=int)
    reached = next((c["elapsed_s"] for c in curve if c["by_length"][longest] >= 0.9), None)
    return {"arm": arm, "mode": report["config"]["select"]["mode"], "phases": phases,
            "longest": int(longest), "longest_heldout": [c["by_length"][longest] for c in curve],
            "longest_0.9_at_s": reached,
            "warm_start_heldout": curve[0]["heldout_all"], "final_heldout": curve[-1]["heldout_all"],
            "best_heldout": max(c["heldout_all"] for c in curve),
            "lift": round(curve[-1]["heldout_all"] - curve[0]["heldout_all"], 3),
            "cycles_run": len(curve) - 1, "curve": curve}


def plot(arms: list[dict], path: Path, family: Family) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arms:
        ax.plot([c["elapsed_s"] for c in a["curve"]], [c["heldout_all"] for c in a["curve"]], marker="o", label=f"{a['arm']} ({a['mode']})")
    ax.set_xlabel("seconds (warm start included)")
    low, high = family.problem_lengths
    for a in arms:
        ax.plot([c["elapsed_s"] for c in a["curve"]], a["longest_heldout"], linestyle="--",
                label=f"{a['arm']}: {a['longest']} letters only")
    ax.set_ylabel(f"held-out greedy accuracy (300 problems, {low}-{high} letters)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"A JSONL-only task ({family.title}): answers vs label-free", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=["answers", "label_free", "value_filter"],
                        default=["answers", "label_free"])
    parser.add_argument("--min-value", type=float, default=0.5, help="value_filter: the value floor of a label")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="each cycle's fine-tune (default: arbor run's)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mirror")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds per arm, warm start included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-problems", type=int, default=1500, help="answered train problems in the file")
    parser.add_argument("--home", type=Path, default=Path("/tmp/arbor-bench-jsonl"))
    parser.add_argument("--out", type=Path, help="default: bench/results/jsonl-family.json, -<family>.json for the others")
    parser.add_argument("--rescore", action="store_true",
                        help="re-score the arms already run in --home (same family, seed and files) instead of running them")
    args = parser.parse_args()

    family = FAMILIES[args.family]
    out = args.out or RESULTS / ("jsonl-family.json" if args.family == "mirror" else f"jsonl-family-{args.family}.json")
    demos, problems = write_family(args.home / "files", args.seed, args.family, args.train_problems)
    if args.rescore:  # the arms' runs as they are in --home, re-scored (phases are not kept there)
        arms = [arm_result(arm, json.loads((args.home / arm / "runs" / f"jsonl-{arm}" / "report.json").read_text()),
                           [], args.home / arm, problems) for arm in args.arms]
    else:
        arms = [run_arm(arm, demos, problems, args.home / arm, args.budget, args.seed, args.min_value,
                        args.learning_rate) for arm in args.arms]
    summary = {"benchmark": "jsonl_family", "family": family.title, "budget_s": args.budget,
               "train_problems": args.train_problems,
               "arms": {a["arm"]: {k: v for k, v in a.items() if k not in ("curve", "arm")} for a in arms}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "curves": {a["arm"]: a["curve"] for a in arms}}, indent=2))
    plot(arms, out.with_suffix(".png"), family)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
