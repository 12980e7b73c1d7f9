"""Issue 3 benchmark: search strategies at equal budget, shared-prefix speed, diversity. JSON out.

    python bench/search.py                         # trains a policy for --train-seconds first (1-4 digits)
    python bench/search.py --model PATH            # or uses a saved one
    python bench/search.py --quick                 # small sizes, a smoke run

Sections (all in one run, baselines measured in the same process on the same model):
  quality    accuracy of the best completion (confidence only, no verifier) against generated tokens per
             problem, every strategy at 3+ budgets, on the addition task at the policy's frontier difficulty;
             best-of-N is scored twice: by confidence and by majority vote (self-consistency)
  speed      tree search with shared-prefix reuse vs recomputing every node's prefix (identical outputs), and
             best-of-16 through the engine vs `generate(num_return_sequences=16, do_sample=True)`
  diversity  diverse beam vs beam at equal width: distinct-n, pairwise Hamming, top-1 score cost
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/ (bench/queue.py would shadow the stdlib)

import torch


from agent.config import BuiltinConfig, TrainConfig  # noqa: E402


from agent.policy import Policy, build_builtin_policy  # noqa: E402
from tasks import get_task  # noqa: E402
from agent.trainer import SFTFineTuner  # noqa: E402
from search import SearchConfig, run_search  # noqa: E402
from agent.select import answer_support, most_confident_with  # noqa: E402


def train_policy(seconds: float, seed: int, task_name: str = "addition") -> Policy:
    """The built-in policy after `seconds` of SFT on difficulties 1-4 of the task (its given answers)."""
    model, tok = build_builtin_policy(BuiltinConfig(seed=seed))
    task = get_task(task_name)
    examples = [{"prompt": p.prompt, "completion": p.answer}
                for d in (1, 2, 3, 4) for p in task.generate(d, 4000, seed=seed)]
    SFTFineTuner(TrainConfig(time_budget_s=seconds, seed=seed)).train(model, tok, examples)
    return Policy(model.eval(), tok, f"bench-sft-{int(seconds)}s")


def greedy_accuracy(policy, problems) -> float:
    res = run_search(problems, SearchConfig(strategy="greedy", max_new_tokens=problems[0].difficulty + 3), policy)
    return sum(bool(r.best.verified) for r in res) / len(res)


def frontier(policy, n: int) -> tuple[int, dict]:
    """The smallest difficulty at which greedy accuracy falls below 70%."""
    accs = {}
    for d in range(2, 10):
        accs[d] = greedy_accuracy(policy, get_task("addition").generate(d, n, seed=11, split="heldout"))
        if accs[d] < 0.7:
            return d, accs
    return d, accs


def run(policy, problems, **kw):
    cfg = SearchConfig(max_new_tokens=problems[0].difficulty + 3, seed=0, **kw)
    t = time.perf_counter()
    res = run_search(problems, cfg, policy)
    return res, time.perf_counter() - t


def voted(result, task):
    """Self-consistency as the label-free selection votes (agent/select.py): the most confident candidate of the
    answer with the most support (the best-ranked one when no candidate is well formed)."""
    support = answer_support(result, task)
    return most_confident_with(result, task, max(support, key=support.get)) if support else result.best


def summarise(label, res, seconds, pick=lambda r: r.best) -> dict:
    n = len(res)
    return {
        "config": label,
        "accuracy": round(sum(bool(pick(r).verified) for r in res) / n, 4),
        "tokens_per_problem": round(sum(r.generated_tokens for r in res) / n, 2),
        "forward_passes_per_problem": round(sum(r.forward_passes for r in res) / n, 2),
        "seconds": round(seconds, 3),
    }


def quality(policy, problems, quick: bool) -> list[dict]:
    rows, task = [], get_task("addition")
    res, s = run(policy, problems, strategy="greedy")
    rows.append(summarise("greedy", res, s))
    for n in (4, 8, 16) if not quick else (4, 16):
        res, s = run(policy, problems, strategy="best_of_n", n=n, temperature=1.0)
        rows.append(summarise(f"best_of_n n={n} (confidence)", res, s))
        rows.append(summarise(f"best_of_n n={n} (majority vote)", res, s, pick=lambda r: voted(r, task)))
    for b in (2, 4, 8) if not quick else (2, 4):
        res, s = run(policy, problems, strategy="beam", beams=b)
        rows.append(summarise(f"beam B={b}", res, s))
        res, s = run(policy, problems, strategy="diverse_beam", beams=b, groups=2, diversity_penalty=1.0)
        rows.append(summarise(f"diverse_beam B={b} G=2", res, s))
    for beams, children in ((1, 2), (2, 2), (2, 4)) if not quick else ((1, 2), (2, 2)):
        res, s = run(policy, problems, strategy="step_beam", beams=beams, children=children, max_step_tokens=2, temperature=1.0)
        rows.append(summarise(f"step_beam beams={beams} children={children} step=2", res, s))
    for sims in (1, 2, 4) if not quick else (1, 2):
        res, s = run(policy, problems, strategy="mcts", simulations=sims, children=2, max_step_tokens=3, temperature=1.0)
        rows.append(summarise(f"mcts sims={sims} children=2 step=3", res, s))
    return rows


def goal(rows) -> dict:
    """Cheapest confidence-guided tree search that matches best-of-16 majority vote."""
    ref = next(r for r in rows if r["config"].startswith("best_of_n n=16 (majority"))
    tree = [r for r in rows if r["config"].split()[0] in ("beam", "diverse_beam", "step_beam", "mcts")]
    ok = sorted((r for r in tree if r["accuracy"] >= ref["accuracy"]), key=lambda r: r["tokens_per_problem"])
    if not ok or ref["accuracy"] == 0:
        return {"reference": ref, "met": False}
    best = ok[0]
    return {"reference": ref, "cheapest_match": best, "token_ratio": round(best["tokens_per_problem"] / ref["tokens_per_problem"], 3),
            "met": best["tokens_per_problem"] <= ref["tokens_per_problem"] / 4}


@contextmanager
def prefixes_reused(reuse: bool):
    """MCTS's tree nodes reuse their parent's cached prefix (the product), or recompute it (the baseline)."""
    import search.mcts

    original = search.mcts.Expander
    search.mcts.Expander = partial(original, reuse_prefix=reuse)
    try:
        yield
    finally:
        search.mcts.Expander = original


def speed_prefix(policy, problems, shots: int) -> dict:
    """MCTS with and without shared-prefix reuse; `shots` solved examples before each prompt make the shared
    prefix long, as in few-shot prompting (0: the bare task prompt)."""
    demos = get_task("addition").generate(problems[0].difficulty, shots, seed=99)
    prefix = "".join(f"{p.prompt}{p.answer}\n" for p in demos)
    probs = [type(p)(**{**p.__dict__, "prompt": prefix + p.prompt}) for p in problems]
    out = {}
    for reuse in (False, True):
        with prefixes_reused(reuse):
            out[reuse] = run(policy, probs, strategy="mcts", simulations=4, children=2, max_step_tokens=2, temperature=1.0)
    same = all([c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates] for a, b in zip(out[True][0], out[False][0]))
    return {"shots": shots, "prompt_tokens": len(probs[0].prompt), "recompute_s": round(out[False][1], 3),
            "reuse_s": round(out[True][1], 3), "speedup": round(out[False][1] / out[True][1], 2), "identical_outputs": same,
            "tokens": sum(r.generated_tokens for r in out[True][0])}


@torch.inference_mode()
def speed_sampling(policy, problems) -> dict:
    """Best-of-16 through the engine vs generate(num_return_sequences=16) on the same prompts; tokens counted
    up to and including EOS for both."""
    max_new = problems[0].difficulty + 3
    t = time.perf_counter()
    res = run_search(problems, SearchConfig(strategy="best_of_n", n=16, temperature=1.0, max_new_tokens=max_new), policy)
    engine_s = time.perf_counter() - t
    engine_tokens = sum(r.generated_tokens for r in res)
    tok, eos = policy.tokenizer, policy.tokenizer.eos_token_id
    enc = tok([p.prompt for p in problems], return_tensors="pt", add_special_tokens=False).to(policy.model.device)  # one length: no padding
    t = time.perf_counter()
    out = policy.model.generate(**enc, do_sample=True, num_return_sequences=16, max_new_tokens=max_new, top_k=0, top_p=1.0, temperature=1.0)
    gen_s = time.perf_counter() - t
    new = out[:, enc.input_ids.shape[1] :]
    ended = (new == eos).int().cumsum(1)
    gen_tokens = int(((ended == 0) | ((ended == 1) & (new == eos))).sum())
    return {"engine_s": round(engine_s, 3), "engine_tokens": engine_tokens, "generate_s": round(gen_s, 3), "generate_tokens": gen_tokens,
            "engine_tokens_per_s": round(engine_tokens / engine_s), "generate_tokens_per_s": round(gen_tokens / gen_s),
            "speedup_tokens_per_s": round((engine_tokens / engine_s) / (gen_tokens / gen_s), 2)}


def distinct_n(cands, n: int) -> float:
    grams = [tuple(c.token_ids[i : i + n]) for c in cands for i in range(len(c.token_ids) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def hamming(cands) -> float:
    pairs = [(x, y) for i, x in enumerate(cands) for y in cands[i + 1 :]]
    d = [sum(a != b for a, b in zip(x.token_ids, y.token_ids)) + abs(len(x.token_ids) - len(y.token_ids)) for x, y in pairs]
    return sum(d) / max(1, len(d))


def diversity(policy, problems) -> list[dict]:
    rows = []
    for b in (4, 8):
        plain, _ = run(policy, problems, strategy="beam", beams=b)
        for name, res in (("beam", plain), ("diverse_beam G=2", run(policy, problems, strategy="diverse_beam", beams=b, groups=2, diversity_penalty=1.0)[0]),
                          (f"diverse_beam G={b}", run(policy, problems, strategy="diverse_beam", beams=b, groups=b, diversity_penalty=1.0)[0])):
            n = len(res)
            rows.append({
                "width": b, "config": name,
                "distinct_1": round(sum(distinct_n(r.candidates, 1) for r in res) / n, 3),
                "distinct_2": round(sum(distinct_n(r.candidates, 2) for r in res) / n, 3),
                "pairwise_hamming": round(sum(hamming(r.candidates) for r in res) / n, 3),
                "distinct_answers": round(sum(len({c.completion for c in r.candidates}) for r in res) / n, 2),
                "top1_score": round(sum(r.best.score for r in res) / n, 4),
                "top1_score_cost_vs_beam": round(sum(a.best.score - r.best.score for a, r in zip(plain, res)) / n, 4),
                "accuracy": round(sum(bool(r.best.verified) for r in res) / n, 3),
            })
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--train-seconds", type=float, default=75.0)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--save", default=None, help="save the trained policy here (to rerun with --model)")
    ap.add_argument("--device", default="cpu", help="run the searches here (the policy is trained on the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    policy = Policy.load(args.model) if args.model else train_policy(args.train_seconds, args.seed)
    train_s = time.perf_counter() - t0
    policy.model.to(args.device)
    if args.save:
        policy.model.save_pretrained(args.save)
        policy.tokenizer.save_pretrained(args.save)
    d, accs = frontier(policy, 100)
    problems = get_task("addition").generate(d, args.problems, seed=12, split="heldout")
    rows = quality(policy, problems, args.quick)
    report = {
        "policy": policy.version, "train_s": round(train_s, 1), "frontier_difficulty": d, "greedy_by_difficulty": accs,
        "problems": len(problems), "quality": rows, "goal": goal(rows),
        "speed_prefix": [speed_prefix(policy, problems[:64], 0), speed_prefix(policy, problems[:64], 16)],
        "speed_sampling": speed_sampling(policy, problems[:64]),
        "diversity": diversity(policy, problems),
        "threads": args.threads, "device": str(policy.model.device), "total_s": None,
    }
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
