"""What a full fine-tune and a LoRA fine-tune cost as a model grows: trainer peak memory, seconds a step and bytes a
version, for Llama-architecture models of several sizes, each measured in a fresh process (peak RSS is per process).

This is what FineTuneConfig.adapter "auto" rests on (agent/adapters.py LORA_FROM_PARAMETERS): where full fine-tuning
stops being cheap in memory, version size and reload time, LoRA takes over.

    python -m bench.fine_tune_memory                      # 10M, 40M and 150M parameters
    python -m bench.fine_tune_memory --sizes 10 --steps 2 # a check that the script runs

Prints one JSON object (last line) and writes it to bench/results/fine_tune_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# hidden size, layers, vocabulary: about 10M, 40M and 150M parameters (Llama proportions, MLP 8/3 of hidden)
SHAPES = {10: (256, 6, 8000), 40: (512, 8, 16000), 150: (1024, 10, 32000)}
SEQUENCE = 128  # tokens a training example
BATCH = 8


def _model(size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, vocab = SHAPES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      max_position_embeddings=SEQUENCE, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def measure(size: int, adapter: str, steps: int) -> dict:
    """One arm in this process: build the model, train `steps` steps as Arbor's trainer would (AdamW, the adapter's
    parameters only under LoRA), save a version, report the process's peak RSS."""
    import torch

    from agent.adapters import lora_config
    from agent.config import TrainConfig

    torch.manual_seed(0)
    model = _model(size)
    parameters = sum(p.numel() for p in model.parameters())
    if adapter == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(TrainConfig(adapter="lora"), model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = SHAPES[size][2]
    batch = torch.randint(0, vocab, (BATCH, SEQUENCE))
    seconds = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        version_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    return {"size": size, "adapter": adapter, "parameters": parameters,
            "trainable": sum(p.numel() for p in trainable),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": sorted(seconds[1:] or seconds)[len(seconds[1:] or seconds) // 2], "version_bytes": version_bytes}


def baseline_rss() -> int:
    """Peak RSS of a process that imported the same libraries and built nothing: subtracted from every arm."""
    code = "import resource, torch, transformers, peft; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--arm", nargs=2, metavar=("SIZE", "ADAPTER"), help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--out", type=Path, default=RESULTS / "fine_tune_memory.json")
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(measure(int(args.arm[0]), args.arm[1], args.steps)))
        return {}
    floor = baseline_rss()
    rows = []
    for size in args.sizes:
        for adapter in ("full", "lora"):
            proc = subprocess.run([sys.executable, "-m", "bench.fine_tune_memory", "--arm", str(size), adapter,
                                   "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["trainer_bytes"] = row["peak_rss_bytes"] - floor
            row["trainer_bytes_per_parameter"] = round(row["trainer_bytes"] / row["parameters"], 2)
            rows.append(row)
            print(f"{size}M {adapter:4}: {row['parameters'] / 1e6:.1f}M parameters, trainer "
                  f"{row['trainer_bytes'] / 2**20:.0f} MiB ({row['trainer_bytes_per_parameter']} B/param), "
                  f"{row['step_s']:.2f} s/step, version {row['version_bytes'] / 2**20:.1f} MiB", flush=True)
    ratios = {}
    for size in args.sizes:
        full, lora = (next(r for r in rows if r["size"] == size and r["adapter"] == a) for a in ("full", "lora"))
        ratios[str(size)] = {"trainer_memory_full_over_lora": round(full["trainer_bytes"] / lora["trainer_bytes"], 2),
                             "step_full_over_lora": round(full["step_s"] / lora["step_s"], 2),
                             "version_full_over_lora": round(full["version_bytes"] / lora["version_bytes"], 1)}
    out = {"benchmark": "fine_tune_memory", "batch": BATCH, "sequence": SEQUENCE, "steps": args.steps,
           "baseline_rss_bytes": floor, "rows": rows, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
