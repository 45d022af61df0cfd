"""Process-group layout for data, memory and tensor parallelism, and what the trainer does with it.

Group layout (W ranks, memory-parallel size P, tensor-parallel size T; consecutive ranks innermost):

    memory parallel   mesh (W/P, P), dims ("replica", "memory")
                      memory groups  = consecutive blocks of P ranks  [0..P-1], [P..2P-1], ...
                      replica groups = ranks holding the same column slice: {r, r+P, r+2P, ...}
    tensor parallel   mesh (W/T, T), dims ("dp", "tp"); fairscale's model-parallel groups are the "tp"
                      rows (consecutive blocks of T), its data-parallel groups the "dp" columns
    data parallel     DDP / FSDP2 over all W ranks, or over the "dp" dim when T > 1

Memory and tensor parallelism are not combined yet (a clear error): the memory layer's token exchange
assumes every rank of a memory group holds different tokens, while a tensor-parallel group shares them.

Sharded parameters (value column shards, tensor-parallel weights) are recorded as `ShardSpec`s by name;
checkpoints always hold the full logical tensors (gathered on save, sliced on load), which is what
makes a run resumable at another P, T or world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from launch.config import ParallelConfig
from launch.distributed import DistInfo
from launch.errors import ConfigError
from memlayers.sharded import gather_rows


@dataclass
class ShardSpec:
    """A parameter stored split along `dim` into `parts` equal pieces, piece `index` on this rank."""

    dim: int
    index: int
    parts: int
    group: dist.ProcessGroup | None
    kind: str  # "memory" | "tensor": which group its gradient norm is summed over
    full_shape: tuple[int, ...] = ()

    def narrow(self, full: torch.Tensor) -> torch.Tensor:
        size = full.shape[self.dim] // self.parts
        return full.narrow(self.dim, self.index * size, size).contiguous()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        moved = _dense(local.detach()).movedim(self.dim, 0).contiguous()
        return gather_rows(moved, self.group).movedim(0, self.dim).contiguous()


@dataclass
class Layout:
    world: int = 1
    rank: int = 0
    memory: int = 1
    tensor: int = 1
    memory_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None  # same column slice, different memory groups
    tp_group: dist.ProcessGroup | None = None
    dp_mesh: object | None = None  # 1-D DeviceMesh for FSDP when T > 1
    dp_group: dist.ProcessGroup | None = None  # for DDP when T > 1
    shards: dict[str, ShardSpec] = field(default_factory=dict)

    @property
    def dp_size(self) -> int:
        return self.world // self.tensor

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor

    def data_info(self, info: DistInfo) -> DistInfo:
        """The rank/world the data stream and validation split use: tensor-parallel peers share data."""
        return DistInfo(rank=self.dp_rank, world=self.dp_size, local_rank=info.local_rank, device=info.device)


def check_parallel_config(
    pcfg: ParallelConfig, world: int, v_dims: list[int] = (), heads: tuple[int, int] | None = None
) -> None:
    """Raise ConfigError naming the keys for a layout that cannot work."""
    P, T = pcfg.memory, pcfg.tensor
    if P > 1 and T > 1:
        raise ConfigError(
            f"parallel.memory={P} with parallel.tensor={T}: memory and tensor parallelism are not combined yet; "
            "use one of them (memory parallel composes with parallel.data=ddp|fsdp)"
        )
    for key, size in (("parallel.memory", P), ("parallel.tensor", T)):
        if world % size:
            raise ConfigError(
                f"{key}={size} must divide the world size {world} (torchrun --nproc_per_node × --nnodes)"
            )
    for v in v_dims:
        if P > 1 and v % P:
            raise ConfigError(
                f"parallel.memory={P} must divide the memory value width {v} (memory.v_dim, or model.dim when unset)"
            )
    if heads is not None and T > 1:
        n_heads, kv_heads = heads
        if n_heads % T or kv_heads % T:
            raise ConfigError(
                f"parallel.tensor={T} must divide model.n_heads={n_heads} and model.n_kv_heads={kv_heads}"
            )


def build_layout(pcfg: ParallelConfig, info: DistInfo) -> Layout:
    """Create the process groups (collective: every rank calls it, in the same order)."""
    check_parallel_config(pcfg, info.world)
    layout = Layout(world=info.world, rank=info.rank, memory=pcfg.memory, tensor=pcfg.tensor)
    if info.world == 1:
        return layout
    from torch.distributed.device_mesh import init_device_mesh

    device = info.device.type
    if pcfg.memory > 1:
        mesh = init_device_mesh(
            device, (info.world // pcfg.memory, pcfg.memory), mesh_dim_names=("replica", "memory")
        )
        layout.memory_group = mesh.get_group("memory")
        layout.replica_group = mesh.get_group("replica")
    if pcfg.tensor > 1:
        from fairscale.nn.model_parallel import initialize as mpu

        mesh = init_device_mesh(device, (info.world // pcfg.tensor, pcfg.tensor), mesh_dim_names=("dp", "tp"))
        if not mpu.model_parallel_is_initialized():
            mpu.initialize_model_parallel(pcfg.tensor)  # same rows as the mesh's "tp" dim
        layout.tp_group = mpu.get_model_parallel_group()
        layout.dp_mesh = mesh["dp"]
        layout.dp_group = mesh.get_group("dp")
    return layout


# ---------------------------------------------------------------------------------------------
# Memory parallelism


def apply_memory_parallel(model: nn.Module, layout: Layout) -> list[nn.Module]:
    """Swap every memory pool for this rank's column shard and record the shards by name."""
    if layout.memory == 1 or layout.world == 1:
        return []
    from memlayers.sharded import ShardedMemoryPool, shard_memory_pools

    pools = shard_memory_pools(model, layout.memory_group)
    for name, module in model.named_modules():
        if isinstance(module, ShardedMemoryPool):
            layout.shards[f"{name}.values"] = ShardSpec(
                1,
                module.shard_index,
                module.num_shards,
                layout.memory_group,
                "memory",
                (module.n_slots, module.v_dim),
            )
    return pools


def sync_sharded_grads(model: nn.Module, layout: Layout) -> None:
    """Average value-shard gradients like data-parallel ones (call once per step, after backward).

    Each shard's gradient is already summed over its memory group's tokens; summing over the replica
    groups adds the other groups' tokens, and dividing by the world size matches the DDP/FSDP mean of
    per-rank mean losses.
    """
    params = dict(model.named_parameters())
    for name in sorted(layout.shards):  # a fixed order: every rank runs the same collectives
        spec = layout.shards[name]
        grad = params[name].grad
        if spec.kind != "memory" or grad is None:
            continue
        if layout.replica_group is not None and dist.get_world_size(layout.replica_group) > 1:
            if grad.is_sparse:  # gloo all-reduces sparse tensors; the sum is re-coalesced
                grad = grad.coalesce()
                dist.all_reduce(grad, group=layout.replica_group)
                params[name].grad = grad = grad.coalesce()
            else:
                dist.all_reduce(grad, group=layout.replica_group)
        grad.mul_(1.0 / layout.world)


def sync_replicated_values(values: list[nn.Parameter], layout: Layout) -> None:
    """With `parallel.memory=1` on several ranks every rank holds the whole value table. It is kept
    out of DDP/FSDP (FSDP would shard it by rows and all-gather the whole table at every forward),
    so its gradient, dense or row-sparse, is averaged here, in a fixed order on every rank."""
    if layout.world == 1 or layout.memory > 1:
        return
    for p in values:
        if p.grad is None:
            continue
        grad = p.grad.coalesce() if p.grad.is_sparse else p.grad
        dist.all_reduce(grad)
        p.grad = (grad.coalesce() if grad.is_sparse else grad).mul_(1.0 / layout.world)


def sharded_grad_sq_norm(model: nn.Module, layout: Layout) -> torch.Tensor:
    """Squared L2 norm of the sharded parameters' gradients, every logical element counted once:
    shard norms summed over their group (replicas hold equal gradients after the sync)."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for kind, group in (("memory", layout.memory_group), ("tensor", layout.tp_group)):
        local = torch.zeros((), dtype=torch.float64)
        names = sorted(n for n, s in layout.shards.items() if s.kind == kind)
        for name in names:
            g = params[name].grad
            if g is not None:
                vals = g.coalesce().values() if g.is_sparse else g
                local += _dense(vals.detach().double().pow(2).sum()).cpu()
        if names:
            dev = next(iter(params[n] for n in names)).device
            local = local.to(dev)
            dist.all_reduce(local, group=group)
            total += local.cpu()
    return total


# ---------------------------------------------------------------------------------------------
# Checkpoints: full logical tensors on disk


def localize_model_state(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """A full state dict sliced to this rank's shards (for loading)."""
    out = dict(state)
    for name, spec in layout.shards.items():
        if name in out:
            out[name] = spec.narrow(out[name])
    return out


def localize_optimizer_state(state: dict, layout: Layout) -> dict:
    """A full optimizer state dict (keyed by parameter name) sliced to this rank's shards."""
    per_param = dict(state.get("state", {}))
    for name, spec in layout.shards.items():
        if name in per_param:
            per_param[name] = {
                k: spec.narrow(v) if _is_param_shaped(v, spec) else v for k, v in per_param[name].items()
            }
    return {**state, "state": per_param}


def _is_param_shaped(v, spec: ShardSpec) -> bool:
    # Moments have the parameter's shape; scalars such as `step` do not.
    return isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(spec.full_shape)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2 keeps parameters (and their moments) as DTensors sharded over the
    data-parallel mesh; `full_tensor` is collective over that mesh, which every rank calls here."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def globalize_model_state(model: nn.Module, state: dict[str, torch.Tensor], layout: Layout) -> None:
    """Replace shard entries of `state` by the full tensors gathered from the live parameters.

    Collective: every rank calls it (ranks without a state, e.g. non-zero ranks under cpu_offload,
    still contribute their shards). Gathers each full tensor onto every rank of its group — at 7B scale
    (a 128 GiB table) write per-rank shards instead; see the README section on checkpoints.
    """
    params = dict(model.named_parameters())
    for name in sorted(layout.shards):
        full = layout.shards[name].gather(params[name])
        if name in state:
            state[name] = full.cpu()


@torch.no_grad()
def globalize_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, layout: Layout
) -> None:
    """Same as `globalize_model_state` for one optimizer's per-parameter state (moments)."""
    params = dict(model.named_parameters())
    per_param = state.get("state", {})
    for name in sorted(layout.shards):
        spec, p = layout.shards[name], params[name]
        live = optimizer.state.get(p, {})
        for key in sorted(
            k for k, v in live.items() if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0
        ):
            full = spec.gather(live[key]).cpu()
            if name in per_param:
                per_param[name][key] = full


# ---------------------------------------------------------------------------------------------
# Tensor parallelism (fairscale's model-parallel layers)


def apply_tensor_parallel(model: nn.Module, layout: Layout) -> None:
    """Split attention heads and FFN hidden units of every block across the tensor-parallel group.

    wq/wk/wv and w1/w3 become ColumnParallelLinear (output split), wo and w2 RowParallelLinear (input
    split, all-reduced output). Weights are copied from the already-initialised dense layers, so a
    T-rank model computes exactly the 1-rank one. Embeddings, norms and memory layers stay replicated
    (their gradients are identical across the group since their inputs are).
    """
    if layout.tensor == 1 or layout.world == 1:
        return
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

    T, r = layout.tensor, dist.get_rank(layout.tp_group)
    from launch.model import Attention, FeedForward

    def swap(parent: nn.Module, attr: str, prefix: str, kind: str) -> None:
        dense: nn.Linear = getattr(parent, attr)
        if dense.bias is not None:
            raise ValueError(
                f"tensor parallel: {prefix}{attr} has a bias; only bias-free Linear layers are split"
            )
        out_f, in_f = dense.weight.shape
        if kind == "column":
            new = ColumnParallelLinear(
                in_f, out_f, bias=False, gather_output=False, init_method=nn.init.zeros_
            )
            spec = ShardSpec(0, r, T, layout.tp_group, "tensor", (out_f, in_f))
        else:
            new = RowParallelLinear(
                in_f, out_f, bias=False, input_is_parallel=True, init_method=nn.init.zeros_
            )
            spec = ShardSpec(1, r, T, layout.tp_group, "tensor", (out_f, in_f))
        new = new.to(device=dense.weight.device, dtype=dense.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(spec.narrow(dense.weight))
        setattr(parent, attr, new)
        layout.shards[f"{prefix}{attr}.weight"] = spec

    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, Attention):
            if module.n_heads % T or module.kv_heads % T:
                raise ConfigError(
                    f"parallel.tensor={T} must divide n_heads={module.n_heads} and n_kv_heads={module.kv_heads}"
                )
            for attr in ("wq", "wk", "wv"):
                swap(module, attr, prefix, "column")
            swap(module, "wo", prefix, "row")
            module.n_heads //= T
            module.kv_heads //= T
        elif isinstance(module, FeedForward):
            if module.w1.weight.shape[0] % T:
                raise ConfigError(
                    f"parallel.tensor={T} must divide the FFN hidden size {module.w1.weight.shape[0]}"
                )
            swap(module, "w1", prefix, "column")
            swap(module, "w3", prefix, "column")
            swap(module, "w2", prefix, "row")
