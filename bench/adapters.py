"""LoRA adapters against full fine-tuning on a user's model, through `arbor run --model DIR`.

The "user's model" is built here: a byte-level BPE tokenizer trained on text made here, and a transformers Llama of
21M parameters pretrained on that text for a few minutes, saved with save_pretrained. The task is a JSONL file with
answers, *letter runs*: 2-5 letters a fixed step apart (1-4, wrapping z -> a), prompt `run: c e g ->`, answer the
next two (` i k`); 96 of the 416 runs are held out. The pretrained model knows a part of it at most: its text holds
runs of step 1 ("f g h i j", and in the task's format "run: c d -> e f"), never a larger step. Both arms run the real
CLI with the same seed and wall-clock budget, each in its own ARBOR_HOME (greedy search: every train problem has an
answer, so a cycle trains on its verified completions and on the answers of the rest):

  full   --adapter full: every parameter trains, a version is a whole model;
  lora   --adapter lora: adapters over the frozen user's model train, a version is the adapter (--dora: DoRA
         adapters, a low-rank direction update and a magnitude per output row, `arbor run --lora-dora`).

Measured in the same run: held-out greedy accuracy of every cycle's policy on all held-out problems (the baseline is
the user's model itself, cycle 0), seconds per cycle, the peak RSS of each arm's `arbor run` process (os.wait4) and
of a training-only process per arm (the real SFT fine-tuner for a few steps: VmHWM, reset after the model loaded),
bytes per version on disk,
and the time a worker takes to switch to a new version: swap_adapter (what workers/cache.py does for an adapter
version over the base it holds) against Policy.load of a full version (what it does otherwise), median of repeats.

    python -m bench.adapters              # the benchmark (about 25 minutes on 2 CPU cores)
    python -m bench.adapters --quick      # a few-minute smoke run of the same steps
    python -m bench.adapters --quick --fixed-steps 60   # no runs: 60-step full and LoRA fine-tunes per learning
                                                        # rate and rank (bench/results/adapters-fixed-steps.json)

Prints one JSON object (last line) and writes bench/results/adapters.json and adapters.png (--dora: adapters-dora.*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LETTERS = string.ascii_lowercase
STEPS, GIVEN, ANSWER_LETTERS = (1, 2, 3, 4), (2, 3, 4, 5), 2


@dataclass
class BenchConfig:
    """The sizes of one benchmark run; --quick shrinks them to a smoke run."""

    hidden: int = 512
    layers: int = 6
    intermediate: int = 1536
    heads: int = 8
    vocab: int = 4096  # the BPE vocabulary at most (the text made here merges to about 570 tokens)
    pretrain_s: float = 240.0
    pretrain_lr: float = 3e-3
    arm_budget_s: float = 480.0  # each arm's --time-budget
    train_seconds: float = 120.0  # one cycle's fine-tune
    problems_per_cycle: int = 320  # every train answer each cycle, as `arbor run`'s default of 3,000 would draw
    lora_rank: int = 4
    # DoRA (--dora): in one 120 s fine-tune of this model on every train answer, held-out 0.77 against plain LoRA's
    # 0.66 and full fine-tuning's 0.85, but in the loop 71% of full's gain against plain LoRA's 66% (docs/benchmarks.md)
    lora_dora: bool = False
    # --lora-plus-ratio (LoRA+, B matrices at this many times A's rate) and --lora-learning-rate-scale (the adapters'
    # rate over full fine-tuning's); unset: `arbor run`'s defaults, read in main()
    lora_plus_ratio: float | None = None
    lora_learning_rate_scale: float | None = None
    switch_repeats: int = 7
    heldout: int = 96  # of the 416 runs; the other 320 are train problems
    memory_steps: int = 3  # optimizer steps of the training-only memory measurement (the peak comes at the first)


QUICK = dict(hidden=256, layers=2, intermediate=704, heads=4, vocab=1024, pretrain_s=30.0, arm_budget_s=90.0,
             train_seconds=15.0, problems_per_cycle=32, switch_repeats=3)


# ---- the text, the tokenizer and the model ----

def spaced(word: str) -> str:
    return " ".join(word)


def random_word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


NOUNS = ["fox", "dog", "cat", "bird", "tree", "river", "stone", "child", "house", "road", "ship", "king", "cloud"]
ADJECTIVES = ["red", "big", "small", "old", "quick", "quiet", "green", "cold", "bright", "dark"]
VERBS = ["sees", "finds", "follows", "likes", "carries", "watches", "meets", "hears"]


def corpus_line(rng: random.Random) -> str:
    """One line of pretraining text: sentences, number facts, the alphabet's order, spaced words copied, and runs of
    consecutive letters, some in the task's own format (step 1 only: larger steps are what the task adds)."""
    kind = rng.randrange(8)
    if kind == 0:
        def phrase():
            return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        return f"{phrase()} {rng.choice(VERBS)} {phrase()}."
    if kind == 1:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return rng.choice([f"{a} plus {b} is {a + b}.", f"the number after {a} is {a + 1}."])
    if kind == 2:
        i = rng.randrange(26)
        return f"the letter after {LETTERS[i]} is {LETTERS[(i + 1) % 26]}."
    if kind == 3:
        w = random_word(rng, 2, 6)
        return f"copy: {spaced(w)} -> {spaced(w)}"
    if kind == 4:
        w = rng.choice(NOUNS + ADJECTIVES)
        return f"{w} is spelled {spaced(w)}."
    i, given = rng.randrange(26), rng.choice(GIVEN)
    run = [LETTERS[(i + k) % 26] for k in range(given + ANSWER_LETTERS)]
    if kind == 5:
        return f"run: {' '.join(run[:given])} -> {' '.join(run[given:])}"
    return " ".join(LETTERS[(i + k) % 26] for k in range(rng.randint(4, 12)))


def train_tokenizer(lines: list[str], vocab: int):
    """A byte-level BPE tokenizer trained on `lines` (it round-trips any text), with eos, pad and bos set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_user_model(cfg: BenchConfig, folder: Path, seed: int) -> dict:
    """Train the tokenizer, pretrain the Llama for cfg.pretrain_s seconds on made-up text, save both to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(f"corpus/{seed}")
    lines = [corpus_line(rng) for _ in range(200_000)]
    tokenizer = train_tokenizer(lines, cfg.vocab)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # one stream of lines, each ended by eos, cut into 128-token rows
    eos = tokenizer.eos_token_id
    ids = [t for ln in tokenizer(lines)["input_ids"] for t in (*ln, eos)]
    seq, batch = 64, 8
    rows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    model.train()
    start, step, losses = time.monotonic(), 0, []
    while (elapsed := time.monotonic() - start) < cfg.pretrain_s:
        warmup = min(1.0, (step + 1) / 5)
        lr = cfg.pretrain_lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / cfg.pretrain_s)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = rows[torch.randint(len(rows), (batch,))]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
    seconds = time.monotonic() - start
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
            "shape": {k: getattr(cfg, k) for k in ("hidden", "layers", "intermediate", "heads")},
            "pretrain_steps": step, "pretrain_tokens": step * batch * seq, "pretrain_s": round(seconds, 1),
            "tokens_per_s": round(step * batch * seq / seconds), "loss_first": round(statistics.mean(losses[:10]), 3),
            "loss_last": round(statistics.mean(losses[-10:]), 3)}


# ---- the task ----

def run_record(start: int, step: int, given: int, split: str) -> dict:
    letters = [LETTERS[(start + k * step) % 26] for k in range(given + ANSWER_LETTERS)]
    # one difficulty: every cycle draws from all steps and lengths (the curriculum would train one at a time)
    return {"prompt": f"run: {' '.join(letters[:given])} ->", "answer": " " + " ".join(letters[given:]),
            "difficulty": 1, "split": split, "meta": {"step": step, "given": given}}


def write_task(path: Path, cfg: BenchConfig, seed: int) -> Path:
    """Every run of letters (26 starts, steps 1-4, 2-5 letters given), a random cfg.heldout of them held out."""
    combos = [(start, step, given) for start in range(26) for step in STEPS for given in GIVEN]
    random.Random(f"task/{seed}").shuffle(combos)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, combo in enumerate(combos):
            f.write(json.dumps(run_record(*combo, "heldout" if i < cfg.heldout else "train")) + "\n")
    return path


# ---- the two arms, through the CLI ----

def run_arm(arm: str, model_dir: Path, problems: Path, home: Path, cfg: BenchConfig, seed: int) -> dict:
    """`arbor run` in a process of its own; its peak RSS comes from os.wait4 on that process."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    command = [sys.executable, "-m", "arbor", "run", "--model", str(model_dir), "--problems", str(problems),
               "--adapter", arm, "--lora-rank", str(cfg.lora_rank), "--time-budget", str(cfg.arm_budget_s),
               "--lora-dora" if cfg.lora_dora else "--no-lora-dora", "--lora-plus-ratio", str(cfg.lora_plus_ratio),
               "--lora-learning-rate-scale", str(cfg.lora_learning_rate_scale),
               "--cycles", "1000", "--strategy", "greedy", "--train-seconds", str(cfg.train_seconds),
               "--problems-per-cycle", str(cfg.problems_per_cycle), "--seed", str(seed),
               "--run-name", f"adapters-{arm}", "--home", str(home), "--device", "cpu", "--json"]
    env = {**os.environ, "ARBOR_HOME": str(home)}
    log = home / "run.log"
    print(f"[{arm}] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"arbor run --adapter {arm} failed (exit {os.waitstatus_to_exitcode(status)}): see {log}")
    report = json.loads((home / "runs" / f"adapters-{arm}" / "report.json").read_text())
    # the CPU seconds the run got in its wall-clock budget, and the machine's load then (other work shares the cores)
    return {"arm": arm, "home": home, "report": report, "wall_s": round(seconds, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "load_avg_15min_after": round(os.getloadavg()[2], 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "log": str(log)}


def registry_of(home: Path):
    from agent.registry import PolicyRegistry
    from agent.settings import Settings
    from agent.store import Store

    settings = Settings(home=home, device="cpu")
    return PolicyRegistry(settings.policies_dir, Store(settings.db_url))


def curve_of(report: dict) -> list[dict]:
    """Each cycle's record: the current policy's held-out greedy accuracy (the loop evaluates every held-out problem,
    all of one difficulty, each cycle) and where the cycle's seconds went."""
    times = {t["cycle"]: t for t in report["time_per_cycle"]}
    return [{"cycle": c["cycle"], "elapsed_s": round(c["elapsed_s"], 1), "policy": c["policy_version"],
             "candidate": c["candidate"], "promoted": c["promoted"], "heldout": c["heldout"]["1"],
             "cycle_s": times[c["cycle"]]["total"], "phases_s": c["seconds"], "train_steps": c["train"].get("steps"),
             "train_loss": c["train"].get("train_loss")} for c in report["cycles"]]


def version_sizes(home: Path) -> dict:
    """Bytes on disk of every version the run saved, by kind."""
    from agent.versions import folder_bytes, kind

    registry = registry_of(home)
    sizes: dict[str, list[int]] = {}
    for row in registry.store.policies():
        folder = registry.folder(row.version)
        if folder.is_dir():
            sizes.setdefault(kind(folder), []).append(folder_bytes(folder))
    return sizes


# ---- switching versions ----

def switch_times(full_folder: Path, adapter_folders: list[Path], repeats: int) -> dict:
    """Seconds for a worker to move to a new version: Policy.load of a whole version (workers/cache.py for a full
    version) against swap_adapter onto the held base (for an adapter version over it); medians of `repeats`."""
    from agent.adapters import load_adapter_policy, swap_adapter
    from agent.policy import Policy

    reloads = []
    for i in range(repeats):
        t = time.perf_counter()
        Policy.load(full_folder, version=f"full-{i}")
        reloads.append(time.perf_counter() - t)
    policy = load_adapter_policy(adapter_folders[0], "swap-0")
    swaps = []
    for i in range(1, repeats + 1):
        folder = adapter_folders[i % len(adapter_folders)]
        t = time.perf_counter()
        policy = swap_adapter(policy, folder, f"swap-{i}")
        swaps.append(time.perf_counter() - t)
    median = statistics.median
    return {"full_reload_s": round(median(reloads), 4), "adapter_swap_s": round(median(swaps), 4),
            "full_reload_all_s": [round(s, 4) for s in reloads], "adapter_swap_all_s": [round(s, 4) for s in swaps],
            "speedup": round(median(reloads) / median(swaps), 1)}


# ---- trainer memory, one process per arm ----

def trainer_memory(adapter: str, model_dir: Path, problems: Path, cfg: BenchConfig) -> dict:
    """Peak RSS of a process that loads the user's model and runs the real SFT fine-tuner for cfg.memory_steps
    steps on the task's answers (the process's own peak, after it loaded the model, and the difference)."""
    out = subprocess.run([sys.executable, "-m", "bench.adapters", "--memory-probe", adapter, "--model", str(model_dir),
                          "--problems", str(problems), "--probe-steps", str(cfg.memory_steps),
                          "--lora-rank", str(cfg.lora_rank)] + ["--dora"] * cfg.lora_dora,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"memory probe {adapter} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


def memory_probe(adapter: str, model_dir: Path, problems: Path, steps: int, rank: int, dora: bool) -> None:
    from agent.config import TrainConfig
    from agent.policy import load_policy
    from agent.trainer import SFTFineTuner
    from tasks.jsonl import read_problems

    examples = [{"prompt": p.prompt, "completion": p.answer} for p in read_problems(problems)[0] if p.split == "train"]
    model, tokenizer = load_policy(model_dir)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak below is the fine-tune's own
    loaded = _status_kb("VmRSS")
    tuner = SFTFineTuner(TrainConfig(adapter=adapter, lora_rank=rank, lora_dora=dora, max_steps=steps,
                                     time_budget_s=3600.0))
    stats = tuner.train(model, tokenizer, examples)
    peak = _status_kb("VmHWM")
    trainable = sum(p.numel() for p in tuner.trained.parameters() if p.requires_grad)
    print(json.dumps({"adapter": adapter, "rss_after_load_mb": round(loaded / 1024, 1),
                      "peak_rss_mb": round(peak / 1024, 1),
                      "training_rss_mb": round((peak - loaded) / 1024, 1), "trainable_parameters": trainable,
                      "steps": stats["steps"], "seconds": stats["seconds"]}))


# ---- learning rates at a fixed step count ----

# (adapter, rank, lora_alpha, learning rate): the first four as first recorded (alpha 32), then alpha at twice the rank
FIXED_STEP_ARMS = (("full", 4, 32, 5e-4), ("lora", 4, 32, 5e-4), ("lora", 4, 32, 5e-3), ("lora", 16, 32, 5e-3),
                   ("lora", 4, 8, 2e-3), ("lora", 4, 8, 5e-3), ("lora", 4, 8, 1e-2))


def fixed_step_comparison(model_dir: Path, problems: Path, steps: int) -> list[dict]:
    """Each (adapter, rank, learning rate) fine-tunes the user's model for `steps` steps on every train answer, in
    this process (no loop, no gate, no wall clock), then answers the held-out problems greedily."""
    from agent.config import LoopConfig, TrainConfig
    from agent.evaluation import evaluate_policy
    from agent.policy import Policy, load_policy
    from agent.trainer import SFTFineTuner
    from tasks.jsonl import read_problems

    read = read_problems(problems)[0]
    train = [{"prompt": p.prompt, "completion": p.answer} for p in read if p.split == "train"]
    heldout = {"all": [p for p in read if p.split == "heldout"]}
    rows = []
    for adapter, rank, alpha, lr in FIXED_STEP_ARMS:
        model, tokenizer = load_policy(model_dir)
        # each arm trains at exactly its own rate (no LoRA scaling of it, one rate for A and B)
        tuner = SFTFineTuner(TrainConfig(adapter=adapter, lora_rank=rank, lora_alpha=alpha, learning_rate=lr,
                                         max_steps=steps, time_budget_s=3600.0, lora_learning_rate_scale=1.0,
                                         lora_plus_ratio=1.0))
        stats = tuner.train(model, tokenizer, train)
        accuracy = evaluate_policy(Policy(tuner.trained.eval(), tokenizer), heldout, LoopConfig().eval_search).accuracy
        rows.append({"adapter": adapter, "rank": rank if adapter == "lora" else None,
                     "alpha": alpha if adapter == "lora" else None, "learning_rate": lr,
                     "steps": stats["steps"], "seconds": stats["seconds"], "train_loss": round(stats["train_loss"], 3),
                     "heldout": round(accuracy["all"], 3)})
        print(f"[fixed steps] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


# ---- the report ----

def plot(arms: dict, path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, a in arms.items():
        ax.plot([c["elapsed_s"] for c in a["curve"]], [c["heldout"] for c in a["curve"]], marker="o", label=name)
    ax.axvline(budget, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("A user's 21M Llama, letter runs: full fine-tuning vs LoRA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gain(curve: list[dict]) -> float:
    return round(curve[-1]["heldout"] - curve[0]["heldout"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run (a smaller model, short arms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, help="seconds per arm (--time-budget of each `arbor run`)")
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--dora", action="store_true", help="the LoRA arm trains DoRA adapters (arbor run --lora-dora)")
    parser.add_argument("--lora-plus-ratio", type=float, help="the LoRA arm trains with LoRA+ at this ratio of B's "
                        "rate to A's (arbor run --lora-plus-ratio)")
    parser.add_argument("--lora-learning-rate-scale", type=float, help="the LoRA arm's rate over full fine-tuning's "
                        "(arbor run --lora-learning-rate-scale)")
    parser.add_argument("--pretrain-seconds", type=float)
    parser.add_argument("--problems-per-cycle", type=int, help="train problems each cycle draws, both arms "
                        "(arbor run --problems-per-cycle)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/arbor-bench-adapters"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fixed-steps", type=int, help="instead of the two runs: fine-tune the user's model this many "
                        "steps per learning rate and LoRA rank, and compare held-out accuracy (no loop)")
    parser.add_argument("--memory-probe", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--problems", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.model, args.problems, args.probe_steps, args.lora_rank, args.dora)
        return

    cfg = BenchConfig(**(QUICK if args.quick else {}), lora_dora=args.dora)
    overrides = {"budget": "arm_budget_s", "lora_rank": "lora_rank", "pretrain_seconds": "pretrain_s",
                 "lora_plus_ratio": "lora_plus_ratio", "lora_learning_rate_scale": "lora_learning_rate_scale",
                 "problems_per_cycle": "problems_per_cycle"}
    for flag, field_name in overrides.items():
        if getattr(args, flag) is not None:
            setattr(cfg, field_name, getattr(args, flag))
    from agent.config import TrainConfig

    product = TrainConfig()
    if cfg.lora_plus_ratio is None:
        cfg.lora_plus_ratio = product.lora_plus_ratio
    if cfg.lora_learning_rate_scale is None:
        cfg.lora_learning_rate_scale = product.lora_learning_rate_scale
    out = args.out or RESULTS / ("adapters-quick.json" if args.quick else "adapters-dora.json" if args.dora
                                 else "adapters.json")
    shutil.rmtree(args.work, ignore_errors=True)
    model_dir = args.work / "user-model"
    t = time.monotonic()
    model = build_user_model(cfg, model_dir, args.seed)
    print(f"[model] {json.dumps(model)}", file=sys.stderr, flush=True)
    problems = write_task(args.work / "task" / "problems.jsonl", cfg, args.seed)
    if args.fixed_steps:
        rows = fixed_step_comparison(model_dir, problems, args.fixed_steps)
        summary = {"benchmark": "adapters_fixed_steps", "quick": args.quick, "seed": args.seed, "model": model,
                   "steps": args.fixed_steps, "arms": rows}
        out = args.out or RESULTS / "adapters-fixed-steps.json"
        out.write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
        return

    arms = {}
    for arm in ("full", "lora"):
        run = run_arm(arm, model_dir, problems, args.work / arm, cfg, args.seed)
        run["curve"] = curve_of(run["report"])
        run["sizes"] = version_sizes(run["home"])
        arms[arm] = run
        points = [(c["cycle"], c["elapsed_s"], c["heldout"]) for c in run["curve"]]
        print(f"[{arm}] peak RSS {run['peak_rss_mb']} MB, (cycle, s, held-out): {points}", file=sys.stderr, flush=True)

    full_registry, lora_registry = registry_of(arms["full"]["home"]), registry_of(arms["lora"]["home"])
    full_folder = full_registry.folder(arms["full"]["curve"][-1]["policy"])
    from agent.versions import kind
    adapter_folders = [lora_registry.folder(r.version) for r in lora_registry.store.policies()
                       if lora_registry.folder(r.version).is_dir() and kind(lora_registry.folder(r.version)) != "full"]
    if not adapter_folders:
        raise SystemExit("the lora arm saved no adapter version: give it a longer --budget")
    switch = switch_times(full_folder, adapter_folders, cfg.switch_repeats)
    memory = {arm: trainer_memory(arm, model_dir, problems, cfg) for arm in ("full", "lora")}

    full_bytes = statistics.median(arms["full"]["sizes"]["full"])
    lora_bytes = statistics.median(arms["lora"]["sizes"]["lora adapter"])
    gains = {arm: gain(a["curve"]) for arm, a in arms.items()}
    gain_ratio = round(gains["lora"] / gains["full"], 3) if gains["full"] > 0 else None
    summary = {
        "benchmark": "adapters", "quick": args.quick, "seed": args.seed, "model": model,
        "task": "letter runs (steps 1-4, 2-5 letters given, 2 to write)", "budget_s": cfg.arm_budget_s,
        "train_seconds": cfg.train_seconds,
        "problems_per_cycle": cfg.problems_per_cycle, "lora_rank": cfg.lora_rank, "lora_dora": cfg.lora_dora,
        "lora_plus_ratio": cfg.lora_plus_ratio, "lora_learning_rate_scale": cfg.lora_learning_rate_scale,
        "arms": {arm: {"start_heldout": a["curve"][0]["heldout"], "final_heldout": a["curve"][-1]["heldout"],
                       "best_heldout": max(c["heldout"] for c in a["curve"]), "gain": gains[arm],
                       "cycles": len(a["curve"]) - 1, "end_s": a["curve"][-1]["elapsed_s"],
                       "median_cycle_s": statistics.median([c["cycle_s"] for c in a["curve"][1:]] or [0.0]),
                       "run_peak_rss_mb": a["peak_rss_mb"], "run_cpu_s": a["cpu_s"],
                       "load_avg_15min_after": a["load_avg_15min_after"], "trainer": memory[arm]}
                 for arm, a in arms.items()},
        "version_bytes": {"full": int(full_bytes), "lora": int(lora_bytes), "ratio": round(full_bytes / lora_bytes, 1)},
        "switch": switch,
        "goals": {"lora_version_50x_smaller": full_bytes / lora_bytes >= 50,
                  "switch_10x_faster": switch["speedup"] >= 10,
                  "lora_90pct_of_full_gain": gain_ratio is not None and gain_ratio >= 0.9},
        "lora_gain_over_full_gain": gain_ratio,
        "wall_s": round(time.monotonic() - t, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    detail = {**summary, "curves": {arm: a["curve"] for arm, a in arms.items()},
              "sizes": {arm: a["sizes"] for arm, a in arms.items()}}
    out.write_text(json.dumps(detail, indent=2))
    plot(arms, out.with_suffix(".png"), cfg.arm_budget_s)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
