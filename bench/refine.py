"""Does refinement solve what the first attempt missed, and does the loop's training make it better than sampling?

For each setting (addition with answers, reversal with answers, addition label-free), one built-in policy is
warm-started on short problems; then the real loop (`arbor run`'s defaults, from that warm start) trains it for
--cycles cycles. On the same held-out problems (the warm start's frontier and the trained policy's), both
policies are measured two ways:

- refinement: a job of R rounds (agent/refine.py: one T=1 sample a round, judged as a job judges it, a rejected
  answer never given again, stopping at an accepted one; the built-in policies are position-coupled, so their
  rounds show no history, agent/refine.py shows_history);
- independent samples: k samples of the plain prompt (T=1), the answer being the first one the same judge accepts
  (the checker with answers: pass@k; label-free: the task's checks), else the most confident.

"Solved" reads the true answer in both. Refinement's later rounds cost tokens only for the problems still going
(and resamples of repeated answers cost tokens too), so each round is also compared with independent samples at
the same generated tokens per problem (the samples' curve read at refinement's tokens).

    python -m bench.refine                                # three settings, about 30 minutes on a 2-core CPU
    python -m bench.refine --settings addition-verifier   # one

Prints one JSON object (last line), writes bench/results/refine.json and bench/results/refine.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

from agent.config import LoopConfig
from agent.evaluation import greedy_solver
from agent.policy import Policy
from agent.refine import answer_key, best_of_rounds, judge_attempts, refine_many
from agent.runner import RunInputs, run_main
from agent.proposals import memoized
from agent.settings import Settings
from bench.selfimprove import shared_warm_start
from search import SearchConfig, run_search
from tasks import Problem, get_task, verify

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"addition-verifier": ("addition", "verifier"), "reversal-verifier": ("reversal", "verifier"),
            "addition-label_free": ("addition", "label_free")}


def greedy_accuracy(policy: Policy, task, difficulty: int, n: int, seed: int) -> float:
    problems = task.generate(difficulty, n, seed=seed, split="heldout")
    cfg = SearchConfig(strategy="greedy", max_new_tokens=task.max_new_tokens(difficulty))
    return sum(bool(r.best.verified) for r in run_search(problems, cfg, policy)) / n


def frontier(policy: Policy, task, start: int, seed: int, low: float = 0.5) -> int:
    """The shortest difficulty from `start` on where greedy accuracy falls below `low` (on 50 problems)."""
    d = start
    while greedy_accuracy(policy, task, d, 50, seed + 99) >= low and d < 60:
        d += 1
    return d


def _check_solver(policy, label_free: bool, max_new: int):
    """The solver a job's label checks ask (label-free; with answers the checker needs none): the policy's greedy
    answers to sub-problems, memoized so that a problem's halves are asked once."""
    return memoized(greedy_solver(policy, SearchConfig(max_new_tokens=max_new))) if label_free else None


def refinement_curve(policy: Policy, task, problems: list[Problem], asked: list[Problem], rounds: int, max_new: int,
                     seed: int, label_free: bool) -> dict:
    cfg = SearchConfig(strategy="best_of_n", n=1, temperature=1.0, max_new_tokens=max_new, seed=seed)
    jobs = refine_many(asked, policy, cfg, rounds, task, _check_solver(policy, label_free, max_new))
    solved, tokens = [], []
    for r in range(1, rounds + 1):
        solved.append(sum(bool(verify(p, best_of_rounds(job[:r])[0].completion)) for p, job in zip(problems, jobs))
                      / len(problems))
        tokens.append(sum(x.result.generated_tokens for job in jobs for x in job[:r]) / len(problems))
    first_solved = [next((r for r, x in enumerate(job) if verify(p, x.best.completion)), None)
                    for p, job in zip(problems, jobs)]
    repeats = 0
    for p, job in zip(problems, jobs):
        rejected: set[str] = set()
        for x in job:
            key = answer_key(task, p, x.best.completion)
            repeats += key in rejected
            if x.verdict.accepted is False:
                rejected.add(key)
    return {"solved": solved, "tokens_per_problem": tokens,
            "solved_after_round_0": sum(s is not None and s > 0 for s in first_solved),
            "repeated_rejected_answers": repeats,
            "resamples": sum(x.resamples for job in jobs for x in job),
            "rounds_run": [sum(len(job) > r for job in jobs) for r in range(rounds)]}


def samples_curve(policy: Policy, task, problems: list[Problem], asked: list[Problem], n: int, max_new: int, seed: int,
                  label_free: bool) -> dict:
    """Answer with k of n independent samples, k = 1..n: the first the judge accepts, else the most confident,
    averaged over the n // k disjoint groups of k."""
    cfg = SearchConfig(strategy="best_of_n", n=n, temperature=1.0, max_new_tokens=max_new, seed=seed)
    results = run_search(asked, cfg, policy)
    solve = _check_solver(policy, label_free, max_new)
    rng = random.Random(seed)
    order = [rng.sample(r.candidates, len(r.candidates)) for r in results]  # sampling order, not the ranking
    flat = [(a, c) for a, cs in zip(asked, order) for c in cs]
    verdicts = iter(judge_attempts([a for a, _ in flat], [c for _, c in flat], task, solve))
    accepted = [[next(verdicts).accepted is True for _ in cs] for cs in order]
    solved = []
    for k in range(1, n + 1):
        total = 0.0
        for p, cs, ok in zip(problems, order, accepted):
            groups = [range(g * k, g * k + k) for g in range(n // k)]
            picks = [next((i for i in g if ok[i]), max(g, key=lambda i: cs[i].mean_logprob)) for g in groups]
            total += sum(bool(verify(p, cs[i].completion)) for i in picks) / len(picks)
        solved.append(total / len(problems))
    per_sample = sum(r.generated_tokens for r in results) / (n * len(problems))
    return {"solved": solved, "tokens_per_problem": [per_sample * k for k in range(1, n + 1)]}


def at_tokens(curve: dict, tokens: float) -> float:
    """The samples' solved share at `tokens` per problem, linear between the k around it."""
    xs, ys = curve["tokens_per_problem"], curve["solved"]
    if tokens <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if tokens <= x1:
            return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    return ys[-1]


def reused(marker: Path, make):
    """`make()`'s JSON-able result, kept in `marker` for --reuse (a later run skips what an earlier one trained)."""
    if marker.exists():
        return json.loads(marker.read_text())
    made = make()
    marker.write_text(json.dumps(made, default=str))
    return made


def trained(warm: Path, task: str, mode: str, cycles: int, seed: int, home: Path) -> tuple[Path, dict]:
    """The loop run for `cycles` cycles from the warm start with `arbor run`'s defaults; the final policy."""
    shutil.rmtree(home, ignore_errors=True)
    base = LoopConfig()
    cfg = replace(base, cycles=cycles, seed=seed, select=replace(base.select, mode=mode))
    report = run_main(Settings(home=home, device="cpu"), cfg, RunInputs(model=warm, task=task, run_name="refine"))
    last = report["cycles"][-1]
    return Path(report["final_policy"]), {
        "promotions": sum(c["promoted"] for c in report["cycles"]), "frontier": last["frontier"],
        "refinement_examples": [c.get("refinement_examples", 0) for c in report["cycles"][1:]],
        "elapsed_s": last["elapsed_s"]}


def measure(name: str, policy: Policy, task, difficulties: list[int], args, label_free: bool) -> dict:
    problems = [p for d in difficulties for p in task.generate(d, args.heldout, seed=args.seed, split="heldout")]
    asked = [replace(p, answer=None) for p in problems] if label_free else problems  # label-free: no answer to read
    max_new = max(task.max_new_tokens(d) for d in difficulties)
    t = time.monotonic()
    refinement = refinement_curve(policy, task, problems, asked, args.rounds, max_new, args.seed + 10, label_free)
    samples = samples_curve(policy, task, problems, asked, 4 * args.rounds, max_new, args.seed + 20, label_free)
    equal = [at_tokens(samples, t) for t in refinement["tokens_per_problem"]]
    out = {"refinement": refinement, "samples": samples,
           "samples_at_equal_tokens": equal,
           "gain_over_samples_at_k": [round(r - s, 3) for r, s in zip(refinement["solved"], samples["solved"])],
           "gain_over_samples_at_equal_tokens": [round(r - s, 3) for r, s in zip(refinement["solved"], equal)],
           "seconds": round(time.monotonic() - t, 1)}
    print(f"[{name}] refinement {[round(x, 3) for x in refinement['solved']]} samples@k "
          f"{[round(x, 3) for x in samples['solved'][:args.rounds]]} samples@tokens {[round(x, 3) for x in equal]} "
          f"after-round-0 {refinement['solved_after_round_0']} repeats {refinement['repeated_rejected_answers']}",
          flush=True)
    return out


def run_setting(setting: str, args, warm_cache: dict) -> dict:
    task_name, mode = SETTINGS[setting]
    task = get_task(task_name)
    home = args.home / setting
    keep = reused if args.reuse else (lambda marker, make: make())
    args.home.mkdir(parents=True, exist_ok=True)
    if task_name not in warm_cache:  # one warm start per task, shared by its settings
        cfg = replace(LoopConfig(), seed=args.seed)
        warm_cache[task_name] = keep(args.home / f"{task_name}-warm.json", lambda: shared_warm_start(
            args.home / f"{task_name}-warm", cfg, task_name))
    warm, warm_s = Path(warm_cache[task_name][0]), warm_cache[task_name][1]
    print(f"[{setting}] warm start {warm_s:.0f} s; training the loop for {args.cycles} cycles", flush=True)
    arms = {"warm start": (warm, {})}
    path, info = keep(home / "trained.json", lambda: trained(warm, task_name, mode, args.cycles, args.seed,
                                                             home / "trained"))
    arms["trained by the loop"] = (Path(path), info)
    policies = {k: Policy.load(str(path)) for k, (path, _) in arms.items()}
    start = max(LoopConfig().warm_start.difficulties) + 1
    difficulties = sorted({frontier(policies["warm start"], task, start, args.seed),
                           frontier(policies["trained by the loop"], task, start, args.seed)})
    print(f"[{setting}] held-out difficulties {difficulties} ({args.heldout} problems each)", flush=True)
    return {"task": task_name, "mode": mode, "warm_start_s": round(warm_s, 1), "difficulties": difficulties,
            "policies": {k: {"training": info, **measure(f"{setting} / {k}", policies[k], task, difficulties, args,
                                                          mode == "label_free")}
                         for k, (_, info) in arms.items()}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (setting, r) in zip(axes[0], results.items()):
        for (name, c), color in zip(r["policies"].items(), ["tab:gray", "tab:blue"]):
            ref, sam = c["refinement"], c["samples"]
            ax.plot(ref["tokens_per_problem"], ref["solved"], marker="o", color=color, label=f"{name}: refinement")
            ax.plot(sam["tokens_per_problem"], sam["solved"], marker="x", linestyle="--", color=color,
                    label=f"{name}: samples")
        ax.set_title(f"{setting}, difficulties {r['difficulties']}")
        ax.set_xlabel("generated tokens per problem")
        ax.set_ylabel("held-out problems solved")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=200, help="held-out problems per difficulty")
    parser.add_argument("--cycles", type=int, default=2, help="loop cycles of each trained policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=Path("/tmp/arbor-bench-refine"))
    parser.add_argument("--out", type=Path, default=RESULTS / "refine.json")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the warm starts and trained policies an earlier run left under --home")
    args = parser.parse_args()

    start = time.monotonic()
    warm_cache: dict = {}
    results = {}
    for setting in args.settings:
        results[setting] = run_setting(setting, args, warm_cache)
        summary = {"benchmark": "refine", "rounds": args.rounds, "heldout_per_difficulty": args.heldout,
                   "cycles": args.cycles, "seed": args.seed, "settings": results,
                   "wall_s": round(time.monotonic() - start, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))  # rewritten after every setting
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({"benchmark": "refine", "wall_s": summary["wall_s"], "settings": {
        s: {"difficulties": r["difficulties"], **{k: {"refinement": [round(x, 3) for x in c["refinement"]["solved"]],
                                                      "samples_at_k": [round(x, 3) for x in c["samples"]["solved"][:args.rounds]],
                                                      "samples_at_equal_tokens": [round(x, 3) for x in c["samples_at_equal_tokens"]],
                                                      "repeats": c["refinement"]["repeated_rejected_answers"]}
                                                  for k, c in r["policies"].items()}}
        for s, r in results.items()}}))


if __name__ == "__main__":
    main()
