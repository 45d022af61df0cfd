"""Process-group setup and small collectives, gloo on CPU and NCCL on GPU. The parallel layout
(mesh, tensor/memory/data parallel) is `launch.parallelize`."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launch.runtime.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(requested: str, local_rank: int, key: str = "train.device") -> torch.device:
    """`key` is how the calling command spells the setting (`train.device` for launch.train, `device`
    for launch.eval), so the error names a key the user can actually pass."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{key}=cuda but CUDA is not available (use {key}=cpu or {key}=auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    device: str = "auto", backend: str = "auto", device_key: str = "train.device"
) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process).
    `device_key` names the device setting in errors (see `pick_device`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank, device_key)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def destroy() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_torchrun_cli(main) -> None:
    """`launch.errors.run_cli(main)`, then, under torchrun (after the process group is destroyed and
    every file closed), exit without the interpreter's teardown: torch's C++ background threads have
    been seen to abort a finished run there ("terminate called without an active exception", -6)."""
    import sys

    from launch.runtime.errors import run_cli

    try:
        run_cli(main)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (keeps collective decisions in lockstep)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)
