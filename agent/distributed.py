"""A train cycle across several processes: `accelerate launch --multi_gpu --num_processes N -m arbor train`
(torchrun works too). Data-parallel over the fine-tune only.

Rank 0 runs the cycle exactly as a single process does: it holds the train lock, reads the store, selects the
labels, evaluates, saves and promotes, so a version is written once. Before each fine-tune it sends the other
ranks what to train on (the parent version and the examples, as JSON); they load that version, join the
fine-tune (DDP starts every rank from rank 0's weights and averages the gradients) and wait for the next
message. On CPU the process group is gloo, on CUDA nccl (accelerate picks it from the device).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Callable

from agent.process_group import broadcast, is_follower, join, launched, leave, rank, world_size

# `arbor train` makes its process-group calls (is_follower, join, launched, leave, world_size) through this module
__all__ = ["end_cycle", "follow", "is_follower", "join", "launch_command", "launched", "leave", "share_fine_tune",
           "world_size"]


def share_fine_tune(parent_version: str, examples: list[dict], train_cfg) -> None:
    """Rank 0: tell the other ranks to join the fine-tune that follows (no-op in a single process)."""
    if world_size() > 1 and rank() == 0:
        broadcast(json.dumps({"parent": parent_version, "examples": examples, "train": asdict(train_cfg)}))


def end_cycle() -> None:
    """Rank 0: no more fine-tunes in this cycle; the other ranks return."""
    if world_size() > 1 and rank() == 0:
        broadcast(None)


def follow(load_parent: Callable[[str], tuple]) -> int:
    """Ranks 1..N-1: join each fine-tune rank 0 announces, until it ends the cycle. `load_parent(version)` gives
    (model, tokenizer) for the announced parent. Returns how many fine-tunes this rank joined."""
    # imported here: the parent that launches the processes (agent/train_cycle.py) needs no trainer
    from agent.config import TrainConfig
    from agent.trainer import SFTFineTuner, clone_for_training

    joined = 0
    while (message := broadcast(None)) is not None:
        order = json.loads(message)
        model, tokenizer = load_parent(order["parent"])
        cfg = TrainConfig(**order["train"])
        SFTFineTuner(cfg).train(clone_for_training(model, cfg.adapter), tokenizer, order["examples"])
        joined += 1
    return joined


def launch_command(processes: int, arbor_args: list[str]) -> list[str]:
    """`accelerate launch` of an `arbor` command over `processes` processes on this host. `--multi_gpu` picks
    torchrun's launcher, which starts the processes on CPU too (accelerate's `--cpu` starts only one without MPI)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "arbor", *arbor_args]
