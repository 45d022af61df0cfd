"""The parallel layout: one DeviceMesh, one function that applies it, in a fixed order.

Mesh. W ranks, memory-parallel size P, tensor-parallel size T, R = W / (P·T) replicas:

    mesh (R, P, T), dims ("replica", "memory", "tp"), "tp" innermost (consecutive ranks)
    "dp"      = ("replica", "memory") flattened: the D = W/T ranks that read different data
    "memory"  the P ranks that hold the P column shards of each value table (they read different
              tokens, which the sharded read exchanges); "replica" ranks hold the same columns
    "tp"      the T ranks that split attention heads and FFN units (they read the same tokens)

Order (`parallelize`), on a model built on the meta device:

    1. tensor parallel      DTensor `parallelize_module`: wq/wk/wv, w1/w3 colwise; wo, w2 rowwise;
                            embeddings, norms and memory layers replicated
    2. memory parallel      value tables swapped for their column shards (`memlayers.shard_layout`)
    3. activation ckpt      `train.activation_checkpoint`: none | full (every block) | selective
                            (every other block); composable, so parameter names do not change
    4. torch.compile        per block, in place (`train.compile`)
    5. FSDP2 fully_shard    over "dp" (ScaleNet positions sharing a block sharded together), values
                            ignored (they are sharded by columns, or averaged by hand)

then `materialize` allocates only this rank's shards (`scalenet.to_empty_tied` keeps growth ties) and
initialises them with `Transformer.init_weights(seed, regions)`, which does not depend on the layout
(`launch.param_init`). DDP wraps after that (it copies rank 0's parameters when built); with T > 1
torch's DDP cannot hold DTensor parameters, so data-parallel gradients are averaged by hand instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from launch.config import Config
from launch.distributed.process_group import DistInfo
from launch.runtime.errors import ConfigError
from memlayers.query_batchnorm import set_query_norm_group
from memlayers.shard_layout import MemoryShardLayout

CHECKPOINT_MODES = ("none", "full", "selective")


@dataclass
class ParallelLayout:
    """How the ranks split the work: memory- and tensor-parallel sizes, the data-parallel wrapper
    (ddp | fsdp) and the mesh over them."""

    world: int = 1
    rank: int = 0
    memory: int = 1
    tensor: int = 1
    data: str = "ddp"
    mesh: object | None = None  # DeviceMesh (replica, memory, tp) with "dp" flattened; None on one process

    @property
    def dp_size(self) -> int:
        return self.world // self.tensor

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor

    def data_info(self, info: DistInfo) -> DistInfo:
        """The rank/world the data stream and validation split use: tensor-parallel peers share data."""
        return DistInfo(rank=self.dp_rank, world=self.dp_size, local_rank=info.local_rank, device=info.device)

    def group(self, dim: str) -> dist.ProcessGroup | None:
        return self.mesh[dim].get_group() if self.mesh is not None else None


def check_layout(cfg: Config, world: int) -> None:
    """Raise ConfigError naming the key for a layout that cannot work, before anything is built."""
    p, m = cfg.parallel, cfg.model
    if p.data not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel.data={p.data!r}: expected ddp or fsdp")
    if cfg.train.activation_checkpoint not in CHECKPOINT_MODES:
        raise ConfigError(
            f"train.activation_checkpoint={cfg.train.activation_checkpoint!r}: expected one of {', '.join(CHECKPOINT_MODES)}"
        )
    for key, size in (("parallel.memory", p.memory), ("parallel.tensor", p.tensor)):
        if size < 1:
            raise ConfigError(f"{key}={size} must be >= 1")
        if world % size:
            raise ConfigError(
                f"{key}={size} must divide the world size {world} (torchrun --nproc_per_node × --nnodes)"
            )
    if world % (p.memory * p.tensor):
        raise ConfigError(
            f"parallel.memory={p.memory} × parallel.tensor={p.tensor} must divide the world size {world}: "
            "the mesh is (replicas, memory, tensor)"
        )
    if p.memory > 1 and cfg.memory.layers:
        v_dim = cfg.memory.v_dim or m.dim
        if v_dim % p.memory:
            raise ConfigError(
                f"parallel.memory={p.memory} must divide the memory value width {v_dim} (memory.v_dim, or model.dim when unset)"
            )
    if p.memory > 1 and cfg.memory.layers and cfg.memory.value_optimizer == "rowwise_adam":
        raise ConfigError(
            "memory.value_optimizer=rowwise_adam with parallel.memory > 1 is not supported: its one second moment "
            "per row is a mean over the whole row, and each rank holds only a column slice; use row_sparse_adam "
            "or adamw (both shard exactly)"
        )
    if p.memory > 1 and world > 1 and cfg.eval.every and cfg.eval.tasks:
        raise ConfigError(
            "eval.tasks during training is not supported with parallel.memory > 1 (ranks would run "
            "different numbers of memory reads); set eval.every=0 and run launch.eval on the checkpoint"
        )
    if p.tensor > 1:
        if m.n_heads % p.tensor or m.kv_heads % p.tensor:
            raise ConfigError(
                f"parallel.tensor={p.tensor} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.kv_heads}"
            )
        if m.hidden_dim % p.tensor:
            raise ConfigError(
                f"parallel.tensor={p.tensor} must divide the FFN hidden size {m.hidden_dim} (model.ffn_dim)"
            )
        if cfg.grow.strategy:
            raise ConfigError(
                f"parallel.tensor={p.tensor} with grow.strategy={cfg.grow.strategy}: adapters on tensor-parallel "
                "weights are not supported; use parallel.data=fsdp and parallel.tensor=1 for grown models"
            )


def build_layout(cfg: Config, info: DistInfo) -> ParallelLayout:
    """Check the layout, then create the mesh (collective: every rank calls it, in the same order)."""
    check_layout(cfg, info.world)
    p = cfg.parallel
    layout = ParallelLayout(world=info.world, rank=info.rank, memory=p.memory, tensor=p.tensor, data=p.data)
    if info.world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        shape = (info.world // (p.memory * p.tensor), p.memory, p.tensor)
        layout.mesh = init_device_mesh(info.device.type, shape, mesh_dim_names=("replica", "memory", "tp"))
        layout.mesh["replica", "memory"]._flatten("dp")
    return layout


# ---------------------------------------------------------------------------------------------
# The steps


def apply_tensor_parallel(model: nn.Module, layout: ParallelLayout) -> None:
    """Split attention heads and FFN hidden units of every block over the "tp" dim (DTensor)."""
    if layout.tensor == 1 or layout.mesh is None:
        return
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from launch.models.llama import Attention, FeedForward

    plans = {
        Attention: {
            "wq": ColwiseParallel(),
            "wk": ColwiseParallel(),
            "wv": ColwiseParallel(),
            "wo": RowwiseParallel(),
        },
        FeedForward: {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()},
    }
    tp_mesh = layout.mesh["tp"]
    for module in model.modules():
        plan = plans.get(type(module))
        if plan is None:
            continue
        parallelize_module(module, tp_mesh, plan)
        if isinstance(module, Attention):  # each rank now computes its n_heads/T heads
            module.n_heads //= layout.tensor
            module.kv_heads //= layout.tensor


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Recompute block activations in backward: `full` every block, `selective` every other one
    (half the saved activations for about a third of the recompute). Composable `checkpoint`: it
    hooks the module in place, so parameter names (and thus init and checkpoints) are unchanged."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint

    seen: set[int] = set()
    for i, block in enumerate(blocks):
        if id(block) in seen or (mode == "selective" and i % 2):
            continue
        seen.add(id(block))
        checkpoint(block)


def apply_compile(blocks: nn.ModuleList) -> None:
    """`torch.compile` each block in place (names unchanged; graphs reused by identical blocks)."""
    seen: set[int] = set()
    for block in blocks:
        if id(block) not in seen:
            seen.add(id(block))
            block.compile()


def apply_fsdp(model: nn.Module, layout: ParallelLayout, ignored: list[nn.Parameter]) -> None:
    """FSDP2 over "dp": each block (or each group of ScaleNet positions that share a block), then
    the root. Ignored parameters (value tables) stay plain local tensors."""
    from torch.distributed.fsdp import fully_shard

    from scalenet import fsdp_units

    kwargs = {"mesh": layout.mesh["dp"], "ignored_params": set(ignored)}
    for unit in fsdp_units(model.layers):
        fully_shard(unit if len(unit) > 1 else unit[0], **kwargs)
    fully_shard(model, **kwargs)


@dataclass
class Parallelized:
    """The model with its layout applied. `model` is the model (parameters, state dicts); `wrapper`
    is what to call for a forward (the DDP wrapper, or the model itself); `memory` owns the value
    tables."""

    model: nn.Module
    layout: ParallelLayout
    memory: MemoryShardLayout
    wrapper: nn.Module = None
    _hand_averaged: list[nn.Parameter] = field(default_factory=list)

    def __post_init__(self):
        self.wrapper = self.wrapper or self.model

    def no_sync(self, enabled: bool):
        """Skip the data-parallel gradient reduction on all but the last micro-batch."""
        if not enabled and hasattr(self.wrapper, "no_sync"):  # DDP
            return self.wrapper.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    @torch.no_grad()
    def sync_grads(self) -> None:
        """After the last backward of a step: value gradients, and data-parallel ones that no
        wrapper reduces (DDP cannot hold the DTensor parameters of tensor parallelism)."""
        self.memory.sync_grads()
        group = self.layout.group("dp")
        for p in self._hand_averaged:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(g, group=group)
                g.mul_(1.0 / self.layout.dp_size)

    def local_shards(self) -> dict[str, tuple]:
        """{name: (process group, dim, full shape)} of the parameters held as plain local shards (the
        value tables' column shards) for the checkpointer; everything else sharded is a DTensor."""
        return {
            name: (self.memory.memory_group, 1, full) for name, (full, _) in self.memory.regions().items()
        }


def parallelize(model: nn.Module, layout: ParallelLayout, cfg: Config) -> Parallelized:
    """Apply the layout to a model on the meta device (see the module docstring for the order)."""
    apply_tensor_parallel(model, layout)
    memory = MemoryShardLayout(model, layout.group("memory"), layout.group("replica"), layout.dp_size)
    if layout.dp_size > 1:
        # Query batchnorm statistics over the global batch: ranks in "dp" hold different tokens
        # (tensor-parallel peers hold the same ones, so they are not in the group).
        set_query_norm_group(model, layout.group("dp"))
    apply_activation_checkpointing(model.layers, cfg.train.activation_checkpoint)
    if cfg.train.compile:
        apply_compile(model.layers)
    if layout.mesh is not None and layout.dp_size > 1 and layout.data == "fsdp":
        apply_fsdp(model, layout, memory.values())
    return Parallelized(model, layout, memory)


def materialize(par: Parallelized, device: torch.device, seed: int) -> Parallelized:
    """Allocate this rank's shards on `device`, initialise them (layout-independent), then wrap DDP."""
    from memlayers.hugepages import advise_huge_pages
    from scalenet import to_empty_tied

    model, layout = par.model, par.layout
    to_empty_tied(model, device)
    for values in par.memory.values():  # before the init touches them (memlayers.hugepages)
        advise_huge_pages(values)
    model.init_weights(seed=seed, regions=par.memory.regions())
    if layout.mesh is None or layout.dp_size == 1 or layout.data != "ddp":
        return par
    values = {id(p) for p in par.memory.values()}
    if layout.tensor > 1:
        par._hand_averaged = [
            p for p in dict.fromkeys(model.parameters()) if id(p) not in values and p.requires_grad
        ]
        return par
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = [n for n, p in model.named_parameters() if id(p) in values]
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ids = [device.index] if device.type == "cuda" else None
    par.wrapper = DDP(model, device_ids=ids, process_group=layout.group("dp"))
    return par
