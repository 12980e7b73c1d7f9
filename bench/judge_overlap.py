"""Is there spare CPU in the loop for the value model? The gate's greedy evaluation run alone on every thread,
against the same evaluation on one thread while the judge trains on the other, in its own process.

The loop keeps both cores busy in every phase (its fine-tune, search and evaluation all run torch on every
thread), so a judge trained beside it would only be free if a phase left a core idle or gained little from it.
The evaluation, greedy decoding in large batches, is the phase most likely to: this measures it on the built-in
model (untrained weights decode to the full answer length, which is what the timing needs) against synthetic
labelled completions for the judge, and reports how much judge work the overlap bought against how much longer
the evaluation took:

    python -m bench.judge_overlap               # ~2 min on 2 cores

Prints one JSON object. `free_judge_s` is the judge work done beside the evaluation, in seconds of the judge alone
on every thread, minus the seconds the evaluation lost: above 0 the overlap pays, at or below 0 it does not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import time

import torch

from agent.config import BuiltinConfig, ValueConfig
from agent.policy import Policy, build_builtin_policy
from search import SearchConfig, run_search
from tasks import get_task


def policy_and_rows(seed: int, rows: int, digits: int):
    """The built-in model (seeded) and labelled completions of `digits`-digit sums, a third of them right."""
    torch.manual_seed(seed)
    model, tokenizer = build_builtin_policy(BuiltinConfig())
    policy = Policy(model.eval(), tokenizer, "bench")
    rng = random.Random(seed)
    labelled = []
    for p in get_task("addition").generate(digits, rows, seed=seed):
        right = rng.random() < 1 / 3
        answer = p.answer if right else "".join(rng.choice("0123456789") for _ in p.answer)
        labelled.append({"prompt": p.prompt, "completion": answer, "label": answer == p.answer})
    return policy, labelled


def train_judge(threads: int, seconds: float, seed: int, rows: int, digits: int, out) -> None:
    """In its own process: a tuned judge trained for `seconds` on `threads` threads; reports its steps."""
    torch.set_num_threads(threads)
    from agent.value import train_value

    policy, labelled = policy_and_rows(seed, rows, digits)
    began = time.monotonic()
    judge = train_value(policy, labelled, ValueConfig(time_budget_s=seconds, epochs=1000))
    out.put({"threads": threads, "steps": judge.meta["steps"], "seconds": round(time.monotonic() - began, 2)})


def evaluate(policy, threads: int, problems) -> float:
    torch.set_num_threads(threads)
    began = time.monotonic()
    run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=len(problems[0].answer) + 2), policy)
    return time.monotonic() - began


def start_judge(ctx, args, threads: int):
    """The judge's training started in its own process: (the process, the queue its steps come back on)."""
    out = ctx.Queue()
    child = ctx.Process(target=train_judge, args=(threads, args.judge_seconds, args.seed, args.rows, args.digits, out))
    child.start()
    return child, out


def finished(child, out) -> dict:
    result = out.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=5000, help="held-out problems the evaluation decodes")
    parser.add_argument("--digits", type=int, default=20)
    parser.add_argument("--rows", type=int, default=3000, help="labelled completions the judge trains on")
    parser.add_argument("--judge-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    policy, _ = policy_and_rows(args.seed, 1, args.digits)
    problems = get_task("addition").generate(args.digits, args.problems, seed=args.seed + 1, split="heldout")
    evaluate(policy, 2, problems[:64])  # first-call costs out of the timings
    eval_all_threads = evaluate(policy, 2, problems)
    eval_one_thread = evaluate(policy, 1, problems)
    alone = finished(*start_judge(ctx, args, 2))
    alone_rate = alone["steps"] / alone["seconds"]

    judge = start_judge(ctx, args, 1)
    time.sleep(args.judge_seconds / 4)  # the child's imports and model, before its training starts
    eval_beside = evaluate(policy, 1, problems)
    beside = finished(*judge)
    # the judge steps that ran while the evaluation did, at the judge's own rate beside it
    overlapped_steps = min(beside["steps"], beside["steps"] / beside["seconds"] * eval_beside)
    judge_work_s = overlapped_steps / alone_rate
    lost_s = eval_beside - eval_all_threads
    print(json.dumps({
        "benchmark": "judge_overlap", "threads": 2, "problems": args.problems, "digits": args.digits,
        "eval_all_threads_s": round(eval_all_threads, 2), "eval_one_thread_s": round(eval_one_thread, 2),
        "eval_one_thread_beside_judge_s": round(eval_beside, 2),
        "judge_alone": alone, "judge_beside_eval": beside,
        "judge_work_beside_eval_s": round(judge_work_s, 2), "eval_lost_s": round(lost_s, 2),
        "free_judge_s": round(judge_work_s - lost_s, 2),
    }))


if __name__ == "__main__":
    main()
