"""Data-parallel training under torchrun, with PyTorch's own DistributedDataParallel.

    torchrun --nproc_per_node=N -m distillrun <train-teachers | distill | specialists> ...

Every process runs the whole stage on the whole data (resident on its device), so every choice
(the batch order, each example's view, the epoch kept) is drawn identically everywhere. Each
global batch of `train.batch_size` is then dealt out to the N processes (examples r, r+N, ...
to process r; a batch of fewer than 2N examples goes to its first n // 2 processes, so that no
share holds a single example); DDP averages the gradients, and each process's loss is weighted
by its share of the batch, so a step is the step one process would take on the whole batch,
however the last batch falls (a process without examples adds a zero gradient). What differs:
BatchNorm, which on CUDA becomes SyncBatchNorm (the global batch's statistics) but on CPU, where
PyTorch has no SyncBatchNorm, normalises each share by its own statistics (the running
statistics kept are process 0's, copied to all before each validation); and dropout, whose
masks each process draws from its own seed (of the run's seed, the epoch and the process, so
that a resumed run draws them again).

Process 0 owns the run folder (manifest, metrics, checkpoints); the others write their copies
to a private temporary folder that is removed at the end, and read the resumable checkpoints
from process 0's folder. NCCL connects GPUs, gloo CPUs.

This module imports torch only inside its functions: the command line imports it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _group() -> Any:
    """torch.distributed when a process group is up (torchrun's, or one a library user made)."""
    dist = sys.modules.get("torch.distributed")  # never imported here just to ask
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    group = _group()
    return group.get_world_size() if group else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    group = _group()
    return group.get_rank() if group else int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """Process 0, or the only one: the process that writes the run folder and prints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, `cuda` means this process's own GPU (LOCAL_RANK)."""
    import torch

    if launched() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def start(device: torch.device) -> None:
    """Join the process group (NCCL for GPUs, gloo for CPUs); nothing without torchrun."""
    import torch.distributed as dist

    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Training data-parallel: a process group of more than one process."""
    group = _group()
    return bool(group) and group.get_world_size() > 1


def broadcast(value: Any) -> Any:
    """Process 0's `value` (any picklable object), in every process."""
    import torch.distributed as dist

    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the processes (in place)."""
    import torch.distributed as dist

    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true in some process (e.g. a SIGTERM one of them received)."""
    import torch

    if not active():
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def process_seed(seed: int, epoch: int) -> int:
    """A seed for this process's own random draws (dropout) in an epoch of a run."""
    return (seed * 1_000_003 + epoch) * 1009 + rank()


def deal(n: int, processes: int, rank: int) -> slice:
    """Process `rank`'s share of a global batch of n examples dealt among `processes`: every
    k-th example from its rank, over the first k = min(processes, n // 2) processes, so that no
    share holds a single example (BatchNorm cannot train on one); the others get none, and
    still take part in the step (`train._Step`)."""
    k = max(1, min(processes, n // 2))
    return slice(rank, n, k) if rank < k else slice(0, 0)


def shard(n: int) -> slice:
    """This process's share of a global batch of n examples (`deal`)."""
    return deal(n, world_size(), rank()) if active() else slice(0, n)


def sync_buffers(model: torch.nn.Module) -> None:
    """Process 0's buffers (BatchNorm's running statistics) in every process: each process's
    last forward pass updated its own."""
    import torch.distributed as dist

    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel (BatchNorm synchronised on CUDA), or as it is."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if not active():
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)
