"""Does refinement help, and does training on refinement rounds make it help more?

A built-in policy warm-started on 1-4 digit addition faces held-out problems a little past what it masters
(--digits). For R = 1..rounds rounds: the share solved by refinement (each round sees the earlier attempts and
the checker's verdicts, agent/refine.py) against the share solved by R independent samples of the plain prompt
(pass@R), at equal generated tokens (one sample per round, both at T=1; the tokens are reported).

Then refinement jobs on train problems make training data: every problem solved in some round gives
{problem prompt, attempt}; one solved in a later round also gives {round prompt, attempt} (the attempts and
feedback it was shown). Two fine-tunes of the same steps from the warm-started policy: on the plain examples
only (control) and on both; the curves are measured again for each. Refinement learns when its gain over
sampling grows with training on its own rounds, beyond what the plain examples give.

    python -m bench.refine                  # about 6 minutes on a 2-core CPU

Prints one JSON object (last line), writes bench/results/refine.json and bench/results/refine.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from agent.config import WarmStartConfig

from agent.warm_start import warm_start_examples
from agent.config import BuiltinConfig
from agent.policy import Policy, build_builtin_policy
from agent.refine import refine_many, refinement_examples
from agent.config import TrainConfig
from agent.trainer import SFTFineTuner, clone_for_training
from search import SearchConfig, run_search
from tasks import get_task

RESULTS = Path(__file__).parent / "results"


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimate of solving with k of n samples (Chen et al. 2021)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def curves(policy: Policy, problems, rounds: int, max_new_tokens: int, seed: int) -> dict:
    """Solved share and generated tokens per round count, for refinement and for independent samples."""
    cfg = SearchConfig(strategy="best_of_n", n=1, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    refined = refine_many(problems, policy, cfg, rounds)
    solved_at = [next((r for r, res in enumerate(rs) if res.best.verified), None) for rs in refined]
    tokens = [0] * rounds
    for rs in refined:
        for r in range(rounds):  # a problem solved early spends nothing in later rounds
            tokens[r] += sum(res.generated_tokens for res in rs[: r + 1])
    n = 2 * rounds  # samples per problem for the pass@k estimate
    sampled = run_search(problems, SearchConfig(strategy="best_of_n", n=n, temperature=1.0, max_new_tokens=max_new_tokens,
                                                seed=seed + 1), policy)
    correct = [sum(bool(c.verified) for c in res.candidates) for res in sampled]
    per_sample = sum(res.generated_tokens for res in sampled) / (n * len(problems))
    return {
        "rounds": list(range(1, rounds + 1)),
        "refine_solved": [sum(s is not None and s < r for s in solved_at) / len(problems) for r in range(1, rounds + 1)],
        "refine_tokens_per_problem": [t / len(problems) for t in tokens],
        "samples_solved": [sum(pass_at_k(n, c, k) for c in correct) / len(problems) for k in range(1, rounds + 1)],
        "samples_tokens_per_problem": [per_sample * k for k in range(1, rounds + 1)],
    }


def training_data(policy: Policy, problems, rounds: int, max_new_tokens: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(plain examples, refinement examples) from refinement jobs on train problems."""
    cfg = SearchConfig(strategy="best_of_n", n=1, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    plain, refined = [], []
    for problem, rs in zip(problems, refine_many(problems, policy, cfg, rounds)):
        last = rs[-1]
        if last.best.verified:
            plain.append({"prompt": problem.prompt, "completion": last.best.completion})
            refined += refinement_examples([last], [last.problem.prompt if len(rs) > 1 else None])
    return plain, refined


def fine_tuned(policy: Policy, examples: list[dict], replay: list[dict], steps: int, seed: int) -> Policy:
    model = clone_for_training(policy.model)
    mix = examples + random.Random(seed).sample(replay, min(len(replay), len(examples)))  # keep what it knew
    SFTFineTuner(TrainConfig(learning_rate=5e-4, time_budget_s=1e9, max_steps=steps, seed=seed)).train(model, policy.tokenizer, mix)
    return Policy(model, policy.tokenizer, "tuned")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, c), color in zip(results.items(), ["tab:gray", "tab:blue", "tab:green"]):
        ax.plot(c["refine_tokens_per_problem"], c["refine_solved"], marker="o", color=color, label=f"{name}: refinement")
        ax.plot(c["samples_tokens_per_problem"], c["samples_solved"], marker="x", linestyle="--", color=color,
                label=f"{name}: independent samples")
    ax.set_xlabel("generated tokens per problem (rounds or samples: 1, 2, ...)")
    ax.set_ylabel("held-out problems solved")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Refinement against independent samples, before and after training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, nargs="+", default=[5, 6], help="held-out and train difficulties")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=200, help="held-out problems per difficulty")
    parser.add_argument("--train-problems", type=int, default=1500, help="train problems per difficulty")
    parser.add_argument("--warm-start", type=float, default=120.0, help="warm-start seconds on 1-4 digits")
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps of each trained policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "refine.json")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    start = time.monotonic()
    task = get_task("addition")
    warm = WarmStartConfig()
    model, tokenizer = build_builtin_policy(BuiltinConfig(seed=args.seed))
    replay = warm_start_examples(task, warm, args.seed)
    SFTFineTuner(TrainConfig(learning_rate=3e-3, time_budget_s=args.warm_start, schedule="time_cosine")).train(model, tokenizer, replay)
    base = Policy(model, tokenizer, "warm-start")
    max_new = max(task.max_new_tokens(d) for d in args.digits)
    heldout = [p for d in args.digits for p in task.generate(d, args.heldout, seed=args.seed, split="heldout")]
    train = [p for d in args.digits for p in task.generate(d, args.train_problems, seed=args.seed, split="train")]

    plain, refined = training_data(base, train, args.rounds, max_new, args.seed)
    if not plain:
        raise SystemExit("the warm-started policy solved none of the train problems: give it a longer --warm-start or "
                         "fewer --digits")
    results = {"warm start": curves(base, heldout, args.rounds, max_new, args.seed + 10)}
    results["trained on plain examples"] = curves(fine_tuned(base, plain, replay, args.steps, args.seed), heldout, args.rounds,
                                                  max_new, args.seed + 10)
    results["trained on plain + refinement examples"] = curves(fine_tuned(base, plain + refined, replay, args.steps, args.seed),
                                                               heldout, args.rounds, max_new, args.seed + 10)
    gains = {name: [round(r - s, 3) for r, s in zip(c["refine_solved"], c["samples_solved"])] for name, c in results.items()}
    summary = {"benchmark": "refine", "digits": args.digits, "rounds": args.rounds, "heldout": len(heldout),
               "train_problems": len(train), "plain_examples": len(plain), "refinement_examples": len(refined),
               "steps": args.steps, "refinement_gain_over_samples": gains, "curves": results,
               "wall_s": round(time.monotonic() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}))


if __name__ == "__main__":
    main()
