"""Data-parallel training under torchrun, with PyTorch's own DistributedDataParallel.

    torchrun --nproc_per_node=N -m distillrun <train-teachers | distill | specialists> ...

Every process runs the whole stage on the whole data (resident on its device), so every choice
(the batch order, each example's view, the epoch kept) is drawn identically everywhere. Each
global batch of `train.batch_size` is then split into N consecutive shards, one per process;
DDP averages the gradients, and each process's loss is weighted by its shard's share, so a step
is the step one process would take on the whole batch. What differs: BatchNorm, which on CUDA
becomes SyncBatchNorm (the global batch's statistics) but on CPU, where PyTorch has no
SyncBatchNorm, uses each shard's own; and dropout, whose masks each process draws from its own
seed (of the run's seed, the epoch and the process, so that a resumed run draws them again).

Process 0 owns the run folder (manifest, metrics, checkpoints); the others write their copies
to a private temporary folder that is removed at the end, and read the resumable checkpoints
from process 0's folder. NCCL connects GPUs, gloo CPUs.

This module imports torch only inside its functions: the command line imports it.
"""

from __future__ import annotations

import os
from typing import Any

TRAINING_STAGES = ("train-teachers", "distill", "specialists")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """Process 0, or the only one: the process that writes the run folder and prints."""
    return rank() == 0


def local_device(device: Any) -> Any:
    """Under torchrun, `cuda` means this process's own GPU (LOCAL_RANK)."""
    import torch

    if launched() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def start(device: Any) -> None:
    """Join the process group (NCCL for GPUs, gloo for CPUs); nothing without torchrun."""
    import torch.distributed as dist

    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(value: Any) -> Any:
    """Process 0's `value` (any picklable object), in every process."""
    import torch.distributed as dist

    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor: Any) -> Any:
    """The sum of `tensor` over the processes (in place)."""
    import torch.distributed as dist

    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flag: bool, device: Any) -> bool:
    """True when `flag` is true in some process (e.g. a SIGTERM one of them received)."""
    import torch

    if not active():
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def process_seed(seed: int, epoch: int) -> int:
    """A seed for this process's own random draws (dropout) in an epoch of a run."""
    return (seed * 1_000_003 + epoch) * 1009 + rank()


def shard(n: int) -> slice:
    """This process's consecutive share of a global batch of n examples."""
    w, r = world_size() if active() else 1, rank() if active() else 0
    return slice(r * n // w, (r + 1) * n // w)


def wrap(model: Any, device: Any) -> Any:
    """`model` in DistributedDataParallel (BatchNorm synchronised on CUDA), or as it is."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if not active():
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)
