"""The process group of a multi-process launch (`accelerate launch --multi_gpu`, torchrun): who this process is,
and the collective calls a fine-tune makes. Outside a launch every call is a single-process no-op.

Below agent/trainer.py, which asks it how many ranks share a batch and when all of them stop; the train cycle's
own messages between ranks are agent/distributed.py's.
"""

from __future__ import annotations

from datetime import timedelta

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


def broadcast(message: str | None) -> str | None:
    """Rank 0's `message` on every rank."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
