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
from datetime import timedelta
from typing import Callable

# Rank 0 may spend a long time on selection and evaluation between fine-tunes while the others wait.
WAIT_FOR_RANK0 = timedelta(hours=6)


def launched() -> bool:
    """Whether this process was started by torchrun (what `accelerate launch --multi_gpu` runs underneath)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_torchelastic_launched()


def _group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in this launch's group (1 outside a launch, or before `join`)."""
    group = _group()
    return group.get_world_size() if group else 1


def rank() -> int:
    group = _group()
    return group.get_rank() if group else 0


def is_follower() -> bool:
    return world_size() > 1 and rank() > 0


def join(device: str) -> None:
    """Join the launch's process group before anything is sent (no-op outside a launch)."""
    if launched():
        from accelerate import PartialState

        PartialState(cpu=not str(device).startswith("cuda"), timeout=WAIT_FOR_RANK0)


def _broadcast(message: str | None) -> str | None:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_fine_tune(parent_version: str, examples: list[dict], train_cfg) -> None:
    """Rank 0: tell the other ranks to join the fine-tune that follows (no-op in a single process)."""
    if world_size() > 1 and rank() == 0:
        _broadcast(json.dumps({"parent": parent_version, "examples": examples, "train": asdict(train_cfg)}))


def end_cycle() -> None:
    """Rank 0: no more fine-tunes in this cycle; the other ranks return."""
    if world_size() > 1 and rank() == 0:
        _broadcast(None)


def leave() -> None:
    """Every rank, when the cycle is over: wait for the others, then tear the group down. A process that exits
    with the group still up can abort in its destructor (seen as SIGABRT after the result was printed)."""
    import torch.distributed as dist

    if _group():
        dist.barrier()
        dist.destroy_process_group()


def agree(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank: the time budget must end the fine-tune at the same step everywhere,
    or the ranks that stop first leave the others waiting in a gradient all-reduce."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def follow(load_parent: Callable[[str], tuple]) -> int:
    """Ranks 1..N-1: join each fine-tune rank 0 announces, until it ends the cycle. `load_parent(version)` gives
    (model, tokenizer) for the announced parent. Returns how many fine-tunes this rank joined."""
    from agent.config import TrainConfig
    from agent.trainer import SFTFineTuner, clone_for_training

    joined = 0
    while (message := _broadcast(None)) is not None:
        order = json.loads(message)
        model, tokenizer = load_parent(order["parent"])
        SFTFineTuner(TrainConfig(**order["train"])).train(clone_for_training(model), tokenizer, order["examples"])
        joined += 1
    return joined


def launch_command(processes: int, arbor_args: list[str]) -> list[str]:
    """`accelerate launch` of an `arbor` command over `processes` processes on this host. `--multi_gpu` picks
    torchrun's launcher, which starts the processes on CPU too (accelerate's `--cpu` starts only one without MPI)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "arbor", *arbor_args]
