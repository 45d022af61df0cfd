"""Process-group setup and data-parallel wrapping (DDP or FSDP2), gloo on CPU and NCCL on GPU."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from launch.errors import UserError


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


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available (use train.device=cpu or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def destroy() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def wrap_data_parallel(
    model: nn.Module,
    mode: str,
    info: DistInfo,
    units: Iterable[nn.Module | list[nn.Module]] = (),
    ignored: Iterable[nn.Parameter] = (),
    dp_mesh=None,
) -> nn.Module:
    """DDP or FSDP2 over all ranks, or over the 1-D `dp_mesh` (tensor parallelism: one rank per
    tensor-parallel group).

    `units` are the FSDP2 shard groups in bottom-up order (each a module or a list of modules that
    share parameters), followed by one root call. `ignored` parameters (memory-parallel value
    shards) stay plain local tensors outside FSDP; with DDP they are excluded from its all-reduce."""
    if not info.enabled:
        return model
    ignored = list(ignored)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if ignored:
            names = {id(p) for p in ignored}
            DDP._set_params_and_buffers_to_ignore_for_model(
                model, [n for n, p in model.named_parameters() if id(p) in names]
            )
        group = dp_mesh.get_group() if dp_mesh is not None else None
        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None, process_group=group)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        kwargs = {"ignored_params": set(ignored)} if ignored else {}
        if dp_mesh is not None:
            kwargs["mesh"] = dp_mesh
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise UserError(f"parallel.data={mode!r}: expected ddp or fsdp")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the data-parallel gradient reduction on all but the last micro-batch."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield
