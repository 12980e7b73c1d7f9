"""Recycled-token drafting (Token Recycling) against plain greedy decoding, everything in one run.

Models:
  (a) the built-in policy after the loop's warm start (1-4 digit addition), on held-out addition prompts;
  (b) a small byte-level-BPE Llama trained here for a few minutes on the Python standard library's own source,
      generating code from prompts cut out of files it did not train on.
Methods (batch 1 unless stated; every method's tokens must be identical to transformers greedy):
  transformers greedy `generate`; transformers prompt lookup (`prompt_lookup_num_tokens`, batch 1 only);
  Arbor greedy (the Decoder, no drafts); Arbor with the paper's 80-node tree; Arbor with the device-sized tree.
  Then batch 8: transformers greedy, Arbor greedy, Arbor with recycling.

    python -m bench.recycling                         # ~10 min on a 2-core CPU, JSON on the last line
    python -m bench.recycling --code-train-seconds 60 --warm-start-seconds 30 --prompts 6   # a quick look

The recycling matrix is hot (as in the paper): it is warmed on separate warm-up prompts before timing, and
the device-sized tree is chosen from the acceptance rates seen there and the forward costs measured here.
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from agent.config import LoopConfig

from agent.evaluation import evaluate_policy
from agent.warm_start import warm_start_examples
from agent.policy import Policy, build_builtin_policy
from agent.trainer import SFTFineTuner
from memory.recycling import PAPER_TREE, RecyclingMemory, TreeSizer
from search.decoder import DecodeStats, Decoder
from tasks import get_task

RESULTS = Path(__file__).parent / "results"


# ----- model (b): a small code model trained here -----

def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The standard library's .py files (tests excluded), split 9:1 into train and held-out by sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not ({"test", "tests", "site-packages", "idlelib"} & set(f.parts)))
    held = files[::10]
    return [f for f in files if f not in set(held)], held


def train_code_model(seconds: float, vocab: int = 4096, seed: int = 0, steps: int | None = None):
    """`steps` bounds training by optimiser steps instead of the clock: the same model on a busy machine."""
    train_files, _ = stdlib_files()
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in train_files]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    ids = torch.tensor([t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    block, batch, max_steps, steps, start = 256, 16, steps, 0, time.monotonic()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    while (steps < max_steps) if max_steps else (time.monotonic() - start < seconds):
        starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=gen)
        x = torch.stack([ids[s: s + block] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    model.eval()
    return model, tokenizer, {"train_s": round(time.monotonic() - start, 1), "steps": steps, "final_loss": round(loss.item(), 3),
                              "parameters": sum(p.numel() for p in model.parameters()), "train_tokens": len(ids)}


def code_prompts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """Prompts of `length` tokens cut from held-out files, at a random line start."""
    _, held = stdlib_files()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = rng.choice(held).read_text(encoding="utf-8", errors="replace")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) < length + 50:
            continue
        s = rng.randrange(0, len(ids) - length)
        out.append(tokenizer.decode(ids[s: s + length]))
    return out


# ----- measurement -----

def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def hf_generate(model, tokenizer, prompts: list[str], new: int, batch: int, **kw) -> tuple[list[list[int]], float]:
    outs, total = [], 0.0
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            res, s = timed(lambda: model.generate(**enc, do_sample=False, max_new_tokens=new, min_new_tokens=0, **kw))
        total += s
        for row in res[:, enc.input_ids.shape[1]:].tolist():
            outs.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return outs, total


def arbor(model, tokenizer, prompts: list[str], new: int, batch: int, memory=None):
    stats = DecodeStats()
    decoder = Decoder(model, tokenizer, draft_source=memory)
    out, s = timed(lambda: decoder.decode(prompts, max_new_tokens=new, max_rows=batch, stats=stats))
    return [d[0].token_ids for d in out], s, stats


def compare(model, tokenizer, prompts: list[str], warmup: list[str], new: int, batch8: bool = True) -> dict:
    """Every method on the same prompts; the recycling memories are warmed (and the sized ones sized, which
    measures forward costs once per process) on the warm-up prompts, outside the timing."""
    vocab = model.config.vocab_size
    memory_full = RecyclingMemory(vocab, tree=PAPER_TREE, size_to_device=False)  # the paper's 80-node template, as is
    arbor(model, tokenizer, warmup, new, 1, memory_full)  # a hot matrix
    hf_generate(model, tokenizer, warmup[:2], new, 1)
    memory_sized = RecyclingMemory(vocab)  # warms up on the grown template, sizes its tree for batch 1, runs its trial
    for _ in range(3):
        arbor(model, tokenizer, warmup, new, 1, memory_sized)

    ref, hf_s = hf_generate(model, tokenizer, prompts, new, 1)
    pld, pld_s = hf_generate(model, tokenizer, prompts, new, 1, prompt_lookup_num_tokens=10)
    plain, plain_s, plain_st = arbor(model, tokenizer, prompts, new, 1)
    full, full_s, full_st = arbor(model, tokenizer, prompts, new, 1, memory_full)
    sized, sized_s, sized_st = arbor(model, tokenizer, prompts, new, 1, memory_sized)
    tokens = sum(len(r) for r in ref)
    sized_nodes = len(memory_sized.tree) - 1

    def row(name, outs, s, st=None):
        d = {"method": name, "tokens_per_s": round(tokens / s, 1), "seconds": round(s, 3), "identical_to_generate": outs == ref}
        if st is not None:
            d["mat"] = round(st.generated_tokens / max(1, st.forward_passes - len(prompts)), 3)  # prefills excluded
        return d

    rows = [row("transformers greedy", ref, hf_s), row("transformers prompt lookup", pld, pld_s),
            row("arbor greedy", plain, plain_s, plain_st), row("arbor recycling, paper 80-node tree", full, full_s, full_st),
            row(f"arbor recycling, device-sized tree ({sized_nodes} nodes)", sized, sized_s, sized_st)]
    costs = TreeSizer.forward_costs(Decoder(model, tokenizer), batch=1,
                                    context=next(iter(memory_sized._sized))[1] if memory_sized._sized else 128)
    result = {
        "prompts": len(prompts), "new_tokens": new, "generated_tokens": tokens, "batch1": rows,
        "speedup_sized_vs_generate": round(hf_s / sized_s, 2), "speedup_sized_vs_prompt_lookup": round(pld_s / sized_s, 2),
        "speedup_sized_vs_arbor_greedy": round(plain_s / sized_s, 2), "speedup_80_vs_generate": round(hf_s / full_s, 2),
        "speedup_80_vs_prompt_lookup": round(pld_s / full_s, 2),
        "sized_tree_nodes": sized_nodes, "sized_trees": memory_sized.sized_trees(), "trials": memory_sized.trials(),
        "forward_cost_ms": {n: round(c * 1000, 2) for n, c in costs.items()},
        "matrix_bytes": memory_full.nbytes, "all_identical": all(r["identical_to_generate"] for r in rows),
    }
    if batch8:
        ref8, hf8_s = hf_generate(model, tokenizer, prompts, new, 8)
        plain8, plain8_s, _ = arbor(model, tokenizer, prompts, new, 8)
        memory8 = memory_sized.copy()
        arbor(model, tokenizer, (warmup * 8)[:24], new, 8, memory8)  # sizes its tree for batch 8 and runs its trial
        rec8, rec8_s, rec8_st = arbor(model, tokenizer, prompts, new, 8, memory8)
        full8, full8_s, _ = arbor(model, tokenizer, prompts, new, 8, memory_full)
        result["batch8"] = {
            "tokens_per_s": {"transformers greedy": round(tokens / hf8_s, 1), "arbor greedy": round(tokens / plain8_s, 1),
                             "arbor recycling, device-sized": round(tokens / rec8_s, 1),
                             "arbor recycling, paper 80-node tree": round(tokens / full8_s, 1)},
            "speedup_sized_vs_generate": round(hf8_s / rec8_s, 2), "speedup_sized_vs_arbor_greedy": round(plain8_s / rec8_s, 2),
            "speedup_80_vs_arbor_greedy": round(plain8_s / full8_s, 2),
            "sized_trees": memory8.sized_trees(), "trials": memory8.trials(),
            "identical": plain8 == ref8 and rec8 == ref8 and full8 == ref8,
        }
    return result


def loop_eval(policy: Policy, cfg: LoopConfig) -> dict:
    """The loop's held-out evaluation phase (greedy over 100 problems per reported difficulty, batched as the loop
    batches it), with recycling off and on: the same accuracies, and the phase's wall clock."""
    heldout = {str(d): get_task("addition").generate(d, cfg.heldout_per_difficulty, seed=0, split="heldout")
               for d in cfg.report_difficulties}
    out = {}
    # a worker's matrix is warm from earlier greedy decodes (refinement rounds, rollouts): warm it at batch 1
    evaluate_policy(policy, {k: v[:4] for k, v in heldout.items()}, replace(cfg.eval_search, recycling=True, max_rows=1))
    for recycling in (False, True):
        search = replace(cfg.eval_search, recycling=recycling)
        # the first pass warms the matrix and, with recycling, measures forward costs for this batch size once
        first, first_s = timed(lambda: evaluate_policy(policy, heldout, search))
        result, seconds = timed(lambda: evaluate_policy(policy, heldout, search))
        out["on" if recycling else "off"] = {"accuracy": result.accuracy, "seconds": round(seconds, 2),
                                             "first_pass_seconds": round(first_s, 2)}
    out["sized_trees"] = policy.draft_source.sized_trees()
    # the loop's batch (every problem of a difficulty at once) is where the sizer may switch drafting off on a CPU
    out["same_accuracy"] = out["on"]["accuracy"] == out["off"]["accuracy"]
    out["speedup"] = round(out["off"]["seconds"] / out["on"]["seconds"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code-train-seconds", type=float, default=240.0)
    ap.add_argument("--code-train-steps", type=int, default=250,
                    help="optimiser steps (what 240 s gave on the idle 2-core machine); 0: train for --code-train-seconds")
    ap.add_argument("--warm-start-seconds", type=float, default=180.0)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "recycling.json")
    ap.add_argument("--code-model", type=Path, default=None, help="save the trained code model here, or reuse it")
    ap.add_argument("--skip-builtin", action="store_true", help="only the code model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "device": "cpu", "paper_tree_nodes": len(PAPER_TREE)}

    if args.code_model and (args.code_model / "config.json").is_file():  # reuse a model this benchmark trained
        model = LlamaForCausalLM.from_pretrained(args.code_model).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.code_model)
        info = json.loads((args.code_model / "training.json").read_text())
    else:
        model, tokenizer, info = train_code_model(args.code_train_seconds, steps=args.code_train_steps or None)
        if args.code_model:
            model.save_pretrained(args.code_model)
            tokenizer.save_pretrained(args.code_model)
            (args.code_model / "training.json").write_text(json.dumps(info))
    prompts = code_prompts(tokenizer, args.prompts + 4, 128, seed=1)
    report["code_model"] = {**info, **compare(model, tokenizer, prompts[4:], prompts[:4], args.new_tokens)}

    if args.skip_builtin:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
        return
    cfg = LoopConfig()
    builtin, btok = build_builtin_policy(cfg.builtin)
    warm = cfg.warm_start.train
    warm.time_budget_s = args.warm_start_seconds
    SFTFineTuner(warm).train(builtin, btok, warm_start_examples(get_task("addition"), cfg.warm_start))
    per = max(4, args.prompts // 3)
    problems = [p.prompt for d in (4, 8, 12) for p in get_task("addition").generate(d, per, seed=3, split="heldout")]
    warmup = [p.prompt for d in (4, 8, 12) for p in get_task("addition").generate(d, 2, seed=4, split="heldout")]
    report["builtin_policy"] = {"warm_start_s": args.warm_start_seconds, **compare(builtin.eval(), btok, problems, warmup, 16)}
    report["loop_heldout_eval"] = loop_eval(Policy(builtin, btok, "warm-start", draft_source=RecyclingMemory(builtin.config.vocab_size)), cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
