"""What a data-parallel trainer has to do differently for memory value tables, in one object.

Value tables are kept out of DDP/FSDP: FSDP would shard them by rows and all-gather the whole table
at every forward, DDP would all-reduce the whole dense table. So the trainer asks a
:class:`MemoryShardLayout` for the few things it needs and holds no memory-specific branches:

    layout = MemoryShardLayout(model, memory_group, replica_group, data_parallel_size)   # shards the pools
    layout.values()          the value parameters (their own optimizer group; FSDP's ignored_params)
    layout.sync_grads()      after backward: average value gradients like data-parallel ones
    layout.grad_sq_norm()    their squared gradient norm, every logical element counted once
    layout.clip_(scale)      scale their gradients (a global-norm clip)
    layout.regions()         {name: (full shape, offset of the local block)} for shard-wise init
    layout.usage_stats()     slot-usage statistics of the training reads
    with layout.untracked(): reads that must not count as training reads (validation)

Groups (any may be None on a single process):
    memory_group   the P ranks that hold the P column shards of a table (P = 1: no sharding)
    replica_group  the ranks that hold the *same* columns but read different tokens: their value
                   gradients are summed; with P = 1 this is the whole data-parallel group
    data_parallel_size  D, the number of ranks with distinct data; gradients are divided by it, the
                   mean of per-rank mean losses that DDP/FSDP compute for every other parameter

Imports only torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from memlayers.optim.lazy_tables import deferred_grad_owner
from memlayers.pool import MemoryPool
from memlayers.sharded import ShardedMemoryPool, gather_columns, shard_memory_pools


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


class MemoryShardLayout:
    def __init__(
        self,
        model: nn.Module,
        memory_group: dist.ProcessGroup | None = None,
        replica_group: dist.ProcessGroup | None = None,
        data_parallel_size: int = 1,
    ) -> None:
        self.model = model
        self.memory_group = memory_group if _group_size(memory_group) > 1 else None
        self.replica_group = replica_group if _group_size(replica_group) > 1 else None
        self.data_parallel_size = data_parallel_size
        if self.memory_group is not None:
            shard_memory_pools(model, self.memory_group)  # works on the meta device: no full table

    @property
    def parts(self) -> int:
        """P: the number of column shards of each table."""
        return _group_size(self.memory_group)

    def pools(self) -> dict[str, MemoryPool]:
        """Registered pools by module name (each once; layers keep unregistered references)."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MemoryPool)}

    def named_values(self) -> dict[str, nn.Parameter]:
        return {f"{n}.values" if n else "values": p.values for n, p in self.pools().items()}

    def values(self) -> list[nn.Parameter]:
        return list(self.named_values().values())

    def regions(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """{value name: (full logical shape, offset of this rank's block in it)} for sharded tables."""
        out = {}
        for name, pool in self.pools().items():
            if isinstance(pool, ShardedMemoryPool):
                out[f"{name}.values" if name else "values"] = (
                    (pool.n_slots, pool.v_dim),
                    (0, pool.columns.start),
                )
        return out

    # -- gradients ------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Average value gradients (dense or row-sparse) like data-parallel ones. Each column
        shard's gradient already sums its memory group's tokens; summing over the replicas adds the
        other groups' tokens. Call once per optimizer step, on every rank, after backward."""
        values = self.named_values()
        if self.replica_group is not None and any(
            deferred_grad_owner(p) is not None for p in values.values()
        ):
            raise RuntimeError(
                "a RowSparseAdam(fused=True, deferred=True) holds a value gradient back until its step, but "
                "replicated values need their gradients averaged first: use fused=False on several ranks"
            )
        for name in sorted(values):  # a fixed order: every rank runs the same collectives
            p = values[name]
            if p.grad is None:
                continue
            grad = p.grad
            if self.replica_group is not None:
                if grad.is_sparse:  # gloo all-reduces sparse tensors; the sum is re-coalesced
                    grad = grad.coalesce()
                    dist.all_reduce(grad, group=self.replica_group)
                    grad = grad.coalesce()
                else:
                    dist.all_reduce(grad, group=self.replica_group)
            p.grad = grad.mul_(1.0 / self.data_parallel_size)

    @torch.no_grad()
    def grad_sq_norm(self) -> Tensor:
        """Squared L2 norm of every value gradient (float64, on CPU), each logical element once:
        shard norms summed over the memory group (replicas hold equal gradients after the sync).
        A gradient that a RowSparseAdam holds back for its fused step counts like a `.grad`."""
        local = torch.zeros((), dtype=torch.float64)
        device = None
        values = self.named_values()
        for name in sorted(values):
            p = values[name]
            owner = deferred_grad_owner(p)
            if owner is not None:
                device = p.device
                local += owner.deferred_grad_sq_norm(p)
            g = p.grad
            if g is None:
                continue
            device = g.device
            vals = g.coalesce().values() if g.is_sparse else g
            local += vals.double().pow(2).sum().cpu()
        if self.memory_group is not None and values:
            device = device or next(iter(values.values())).device
            local = local.to(device)
            dist.all_reduce(local, group=self.memory_group)
        return local.cpu()

    def clip_(self, scale: float) -> None:
        for p in self.values():
            if p.grad is not None:
                p.grad.mul_(scale)
            owner = deferred_grad_owner(p)
            if owner is not None:
                owner.scale_deferred_grad(p, scale)

    # -- full tables (checkpoints in the full-tensor format) -------------------------------------

    @torch.no_grad()
    def full_tensor(self, name: str, local: Tensor) -> Tensor:
        """The full table-shaped tensor from this rank's block (collective over the memory group)."""
        pool = self._pool_of(name)
        if not isinstance(pool, ShardedMemoryPool):
            return local
        return gather_columns(local.to_dense() if local.is_sparse else local, pool.group)

    def _pool_of(self, value_name: str) -> MemoryPool:
        return self.pools()[value_name.rsplit(".", 1)[0] if "." in value_name else ""]

    # -- usage statistics -----------------------------------------------------------------------

    def track_usage(self, enabled: bool = True) -> None:
        for pool in self.pools().values():
            pool.track_usage = enabled

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Reads inside do not count in the usage statistics (they describe training reads only)."""
        pools = list(self.pools().values())
        saved = [p.track_usage for p in pools]
        for p in pools:
            p.track_usage = False
        try:
            yield
        finally:
            for p, flag in zip(pools, saved):
                p.track_usage = flag

    def usage_stats(self, reset: bool = True) -> dict[str, float]:
        """Each pool's statistics (this rank's reads); keys of the second pool onwards get `_i`."""
        stats = {}
        for i, pool in enumerate(self.pools().values()):
            for k, v in pool.usage_stats(reset=reset).items():
                stats[k if i == 0 else f"{k}_{i}"] = v
        return stats
