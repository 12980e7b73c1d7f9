"""A value model learned from the loop's own labels: does search guided by it find what greedy misses? JSON out.

    python -m bench.value                  # trains the built-in policy first (1-4 digits, as bench/search.py)
    python -m bench.value --model PATH     # or uses a saved one
    python -m bench.value --quick          # small sizes, a smoke run
    python -m bench.value --task reversal  # the same table on word reversal (a policy trained on 1-4 letters)

The policy's fine-tune is bounded by time (as bench/search.py's): on a busy machine it trains less, and
`frontier_in_range` in the output says whether its frontier still has greedy between 0.3 and 0.7.

One policy; a value model (agent/value.py) trained on its own best-of-16 candidates for *train* problems at the
frontier and the length below, labelled by the task's checker (what the loop's verifier mode labels; label-free
labels are the accepted and rejected answers). Then, on held-out problems at the frontier (the length where
greedy is between 0.3 and 0.7) and at one length past the trained length, every row in one run:

  greedy, pass@4, pass@16 (any candidate right: the ceiling a judge could reach), best-of-16 by confidence,
  majority vote, best-of-16 reranked by value, by value+mean_logprob, value-weighted vote, step beam and MCTS
  ranked by the value; accuracy, generated tokens and forward passes per problem, plus the value model's own
  trunk forwards and scored tokens (its cost beside the policy's);
  AUROC of the value against confidence (mean and min token log-prob) at telling right from wrong candidates;
  adaptive search (greedy, then --repairs repairs of the greedy answer, then 2, 4 and 10 samples, then MCTS, each
  only where the value of the best answer so far is under the accept score and, after a repair or sampling stage,
  not under the give-up score), once under each calibration (search/calibration.py, on validation problems at the
  frontier length; --calibrate-at both: and past it) and each number of repairs: the accept score for 95% precision
  of greedy answers, and the accept and give-up scores for a third of best-of-16's tokens.

Goals (booleans): value-guided search closes >= 50% of the greedy -> pass@16 gap at no more than best-of-16's
generated tokens; value AUROC >= 0.85; adaptive search reaches >= 90% of the best value-guided row's gain over
greedy at no more than a third of best-of-16's generated tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/ (bench/queue.py would shadow the stdlib)

import torch  # noqa: E402

from agent.policy import Policy  # noqa: E402
from agent.value import ValueConfig, ValueModel, train_value, value_vote  # noqa: E402
from search.calibration import auroc, calibrate  # noqa: E402
from bench.search import greedy_accuracy, train_policy, voted  # noqa: E402
from search import SearchConfig, run_search  # noqa: E402
from search.scorers import load_scorer, rank_all  # noqa: E402
from tasks import get_task  # noqa: E402

TRAINED_LENGTH = 4  # bench.search.train_policy trains on difficulties 1-4 (digits, letters)
TASK = "addition"  # --task
CALIBRATIONS: dict[str, dict] = {}  # rule -> the thresholds it stored and the repairs (adaptive is run under each)
ADAPTIVE = dict(strategy="adaptive", n=16, temperature=1.0, simulations=2, children=2, max_step_tokens=2,
                leaf_value="prefix")


def frontier(policy, n: int) -> tuple[int, dict]:
    """The shortest length at which greedy accuracy falls to 0.7 or below (it should be at least 0.3)."""
    accs = {}
    for d in range(2, 12):
        accs[d] = greedy_accuracy(policy, get_task(TASK).generate(d, n, seed=11, split="heldout"))
        if accs[d] <= 0.7:
            break
    return d, accs


def search(policy, problems, **kw):
    cfg = SearchConfig(max_new_tokens=problems[0].difficulty + 3, seed=kw.pop("seed", 0), **kw)
    vm = policy.value_model
    before = (vm.forward_passes, vm.scored_tokens) if vm is not None else (0, 0)
    t = time.perf_counter()
    res = run_search(problems, cfg, policy)
    cost = (vm.forward_passes - before[0], vm.scored_tokens - before[1]) if vm is not None else (0, 0)
    return res, time.perf_counter() - t, cost


def row(label, res, seconds, pick=lambda r: r.best, value_cost=(0, 0), correct=None) -> dict:
    n = len(res)
    right = correct if correct is not None else [bool(pick(r).verified) for r in res]
    return {"config": label, "accuracy": round(sum(right) / n, 4),
            "tokens_per_problem": round(sum(r.generated_tokens for r in res) / n, 2),
            "forward_passes_per_problem": round(sum(r.forward_passes for r in res) / n, 2),
            "value_forwards": value_cost[0], "value_scored_tokens_per_problem": round(value_cost[1] / n, 1),
            "seconds": round(seconds, 2)}


def labelled_candidates(policy, difficulties, n: int, seed: int) -> list[dict]:
    """Best-of-16 candidates for train problems, labelled right or wrong by the task's checker."""
    out = []
    for d in difficulties:
        res, _, _ = search(policy, get_task(TASK).generate(d, n, seed=seed, split="train"),
                           strategy="best_of_n", n=16, temperature=1.0, seed=seed)
        out += [{"prompt": r.problem.prompt, "completion": c.completion, "label": bool(c.verified)}
                for r in res for c in r.candidates if c.finished]
    return out


def rerank(policy, res, spec: str):
    """The same candidates ranked by `spec` (copies: the confidence ranking of `res` stays as it was)."""
    from dataclasses import replace

    vm = policy.value_model
    before = (vm.forward_passes, vm.scored_tokens)
    t = time.perf_counter()
    ranked = rank_all(load_scorer(spec, False, 1.0, policy), [r.problem for r in res],
                      [[replace(c) for c in r.candidates] for r in res])
    out = [replace(r, candidates=cs) for r, cs in zip(res, ranked)]
    return out, time.perf_counter() - t, (vm.forward_passes - before[0], vm.scored_tokens - before[1])


def evaluate(policy, d: int, n: int, quick: bool) -> dict:
    task = get_task(TASK)
    problems = task.generate(d, n, seed=12, split="heldout")
    rows = []
    res, s, _ = search(policy, problems, strategy="greedy")
    rows.append(row("greedy", res, s))
    res4, s4, _ = search(policy, problems, strategy="best_of_n", n=4, temperature=1.0)
    rows.append(row("pass@4 (any of 4 right)", res4, s4, correct=[any(c.verified for c in r.candidates) for r in res4]))
    res16, s16, _ = search(policy, problems, strategy="best_of_n", n=16, temperature=1.0)
    rows.append(row("pass@16 (any of 16 right)", res16, s16, correct=[any(c.verified for c in r.candidates) for r in res16]))
    rows.append(row("best_of_16 confidence (mean_logprob)", res16, s16))
    rows.append(row("best_of_16 majority vote", res16, s16, pick=lambda r: voted(r, task)))
    by_value, sv, cost = rerank(policy, res16, "value")
    rows.append(row("best_of_16 value", by_value, s16 + sv, value_cost=cost))
    rows.append(row("best_of_16 value-weighted vote", by_value, s16 + sv, pick=lambda r: value_vote(r, task), value_cost=cost))
    mixed, sm, cost_m = rerank(policy, res16, "value+mean_logprob")
    rows.append(row("best_of_16 value+mean_logprob", mixed, s16 + sm, value_cost=cost_m))
    for beams, children in ((2, 4),) if quick else ((2, 4), (4, 4)):
        res, s, cost = search(policy, problems, strategy="step_beam", beams=beams, children=children, max_step_tokens=1,
                              temperature=1.0, scorer="value")
        rows.append(row(f"step_beam value beams={beams} children={children} step=1", res, s, value_cost=cost))
    for sims in (2,) if quick else (2, 4):
        res, s, cost = search(policy, problems, strategy="mcts", simulations=sims, children=2, max_step_tokens=2,
                              temperature=1.0, scorer="value")
        rows.append(row(f"mcts value sims={sims} children=2 step=2", res, s, value_cost=cost))
    adaptive = {}
    for rule, stored in CALIBRATIONS.items():  # adaptive search under each calibration's stored thresholds
        policy.value_model.meta.update(accept_score=stored["accept_score"], give_up_score=stored["give_up_score"])
        res, s, cost = search(policy, problems, **ADAPTIVE, repairs=stored["repairs"])
        repaired = f"{stored['repairs']} repairs, " if stored["repairs"] else ""
        rows.append(row(f"adaptive by value ({rule}): greedy, then {repaired}2, 4 and 10 samples, then mcts", res, s,
                        value_cost=cost))
        adaptive[rule] = {**adaptive_goal(rows, res), "ended_at": _ended_at(res)}
    # right against wrong among the 16 samples' finished candidates: does the value tell them apart?
    cands = [(r, c) for r in res16 for c in r.candidates if c.finished]
    labels = [bool(c.verified) for _, c in cands]
    values = policy.value_model.score([r.problem.prompt for r, _ in cands], [c.token_ids for _, c in cands])
    separation = {"candidates": len(cands), "right": sum(labels),
                  "auroc_value": _round(auroc([v[-1] for v in values], labels)),
                  "auroc_mean_logprob": _round(auroc([c.mean_logprob for _, c in cands], labels)),
                  "auroc_min_logprob": _round(auroc([c.min_logprob for _, c in cands], labels))}
    return {"difficulty": d, "problems": n, "rows": rows, "separation": separation, "goal": goal(rows),
            "adaptive": adaptive}


def _ended_at(results) -> dict:
    """Where each problem's adaptive search stopped: how many, how many right, the tokens they spent."""
    ended = {}
    for r in results:
        e = ended.setdefault(r.stages[-1]["stage"], {"problems": 0, "right": 0, "tokens": 0})
        e["problems"] += 1
        e["right"] += bool(r.best.verified)
        e["tokens"] += r.generated_tokens
    return ended


def _round(x):
    return None if x is None else round(x, 4)


def goal(rows: list[dict]) -> dict:
    """The best value-guided row within best-of-16's generated tokens, and the share of the greedy -> pass@16 gap
    it closes."""
    acc = {r["config"]: r for r in rows}
    greedy, ceiling = acc["greedy"]["accuracy"], acc["pass@16 (any of 16 right)"]["accuracy"]
    budget = acc["best_of_16 confidence (mean_logprob)"]["tokens_per_problem"]
    guided = [r for r in rows if "value" in r["config"] and r["tokens_per_problem"] <= budget]
    best = max(guided, key=lambda r: r["accuracy"])
    gap = ceiling - greedy
    closed = (best["accuracy"] - greedy) / gap if gap > 0 else None
    return {"best_value_guided": best["config"], "accuracy": best["accuracy"], "greedy": greedy, "pass@16": ceiling,
            "gap_closed": _round(closed), "met": closed is not None and closed >= 0.5}


def adaptive_goal(rows: list[dict], results) -> dict:
    """The last adaptive row's gain over greedy as a share of the best value-guided row's, and its tokens as a share of
    best-of-16's."""
    acc = {r["config"]: r for r in rows}
    greedy = acc["greedy"]["accuracy"]
    budget = acc["best_of_16 confidence (mean_logprob)"]["tokens_per_problem"]
    adaptive = rows[-1]
    guided = [r for r in rows if "value" in r["config"] and not r["config"].startswith("adaptive")
              and r["tokens_per_problem"] <= budget]
    best = max(guided, key=lambda r: r["accuracy"])
    gain = best["accuracy"] - greedy
    share = (adaptive["accuracy"] - greedy) / gain if gain > 0 else None
    tokens = adaptive["tokens_per_problem"] / budget
    escalated = sum(len(r.stages) > 1 for r in results) / len(results)
    return {"accuracy": adaptive["accuracy"], "escalated_share": round(escalated, 4),
            "share_of_value_gain": _round(share), "tokens_vs_best_of_16": round(tokens, 4),
            "met": share is not None and share >= 0.9 and tokens <= 1 / 3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="addition", choices=("addition", "reversal"))
    ap.add_argument("--model", default=None, help="a saved policy folder (default: train the built-in one)")
    ap.add_argument("--train-seconds", type=float, default=75.0)
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per length")
    ap.add_argument("--train-problems", type=int, default=1500, help="train problems per length for the value model")
    ap.add_argument("--trunk", default="tuned", choices=("frozen", "tuned"), help="the value model's trunk")
    ap.add_argument("--value-seconds", type=float, default=240.0, help="time budget of the value model's training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--save", default=None, help="save the trained policy here (to rerun with --model)")
    ap.add_argument("--value", default=None, help="a saved value model folder (default: train one; --save-value keeps it)")
    ap.add_argument("--save-value", default=None, help="save the trained value model here (to rerun with --value)")
    ap.add_argument("--calibrate-at", default="frontier", choices=("frontier", "both"),
                    help="the validation problems adaptive search is calibrated on: the frontier length, or it and the "
                         "length past the trained one")
    ap.add_argument("--repairs", type=int, nargs="+", default=[0, 6],
                    help="adaptive search is calibrated and run with each number of repairs before sampling")
    args = ap.parse_args()
    if args.quick:
        args.problems, args.train_problems, args.train_seconds = 48, 100, min(args.train_seconds, 30.0)
        args.value_seconds = min(args.value_seconds, 30.0)
    torch.set_num_threads(args.threads)
    global TASK
    TASK = args.task
    t0 = time.perf_counter()
    policy = Policy.load(args.model) if args.model else train_policy(args.train_seconds, args.seed, args.task)
    train_s = time.perf_counter() - t0
    if args.save:
        policy.model.save_pretrained(args.save)
        policy.tokenizer.save_pretrained(args.save)
    d, accs = frontier(policy, 100)
    past = max(d, TRAINED_LENGTH) + 1
    t = time.perf_counter()
    if args.value:
        vm, sample_s = ValueModel.load(args.value, policy), 0.0
    else:
        labelled = labelled_candidates(policy, sorted({max(1, d - 1), d}), args.train_problems, seed=5)
        sample_s = time.perf_counter() - t
        vm = train_value(policy, labelled, ValueConfig(trunk=args.trunk, time_budget_s=args.value_seconds,
                                                        seed=args.seed))
    if args.save_value:
        vm.save(args.save_value)
    policy.value_model = vm
    # adaptive search's thresholds, on validation problems (neither the value model's train problems nor the
    # evaluated held-out ones) at both evaluated lengths
    # calibrated for one budget at one length: mixed with a length where escalation seldom pays, the best pair
    # for the mix spent the frontier's tokens too cheaply (0.655 at 23% of best-of-16's tokens, against 0.74)
    lengths = (d, past) if args.calibrate_at == "both" else (d,)
    validation = [p for length in lengths for p in get_task(TASK).generate(
        length, args.problems, seed=13, split="validation")]
    calibration = {}
    for repairs in args.repairs:
        for rule, share in (("95% precision", None), ("a third of the tokens", 1 / 3)):
            label = f"{rule}, {repairs} repairs"
            t = time.perf_counter()
            if share is None and repairs != args.repairs[0]:  # this rule reads greedy answers only: the same scores
                calibration[label] = calibration[f"{rule}, {args.repairs[0]} repairs"]
            else:
                calibration[label] = calibrate(vm, policy, validation, max_new_tokens=past + 3, budget_share=share,
                                               cfg=SearchConfig(**ADAPTIVE, repairs=repairs))
                calibration[label]["seconds"] = round(time.perf_counter() - t, 1)
            CALIBRATIONS[label] = {"accept_score": calibration[label]["accept_score"],
                                   "give_up_score": calibration[label].get("give_up_score"), "repairs": repairs}
    report = {"task": args.task, "policy": policy.version, "train_s": round(train_s, 1), "greedy_by_difficulty": accs,
              "frontier_difficulty": d, "frontier_in_range": 0.3 <= accs[d] <= 0.7,
              "trained_length": TRAINED_LENGTH, "past_trained_length": past,
              "value_model": {**vm.meta, "sampling_s": round(sample_s, 1), "config": vars(vm.cfg)},
              "calibration": calibration,
              "frontier": evaluate(policy, d, args.problems, args.quick),
              "past": evaluate(policy, past, args.problems, args.quick)}
    report["goals"] = {
        "value_search_closes_half_the_gap_at_frontier": report["frontier"]["goal"]["met"],
        "value_auroc_at_least_0.85_frontier": (report["frontier"]["separation"]["auroc_value"] or 0) >= 0.85,
        "value_auroc_at_least_0.85_past": (report["past"]["separation"]["auroc_value"] or 0) >= 0.85,
        "adaptive_90pct_of_gain_at_a_third_of_the_tokens": any(a["met"] for a in report["frontier"]["adaptive"].values()),
    }
    report["threads"], report["total_s"] = args.threads, round(time.perf_counter() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
