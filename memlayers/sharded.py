"""Memory values sharded by embedding dimension across a memory-parallel group of P ranks.

Rank r of the group holds ``values[:, r*Dv/P : (r+1)*Dv/P]``: a (N*N, Dv/P) column shard. A read of
the whole table for the group's tokens is then

    forward   all-gather (indices, weights) in the group      every rank sees every token's slots
              local lookup into the column shard               (T_group, Dv/P): my columns, all tokens
              all-to-all                                        (T_mine, Dv):   all columns, my tokens
    backward  all-to-all of the output gradient                (T_group, Dv/P)
              lookup backward                                  value grad stays local to the shard;
              reduce-scatter of the weight gradient            each token's owner gets the sum over
                                                               column slices

The value-shard gradient comes out *summed over the group's tokens*; averaging it like data-parallel
gradients (and across groups that replicate the same slice) is the trainer's job: see
``memlayers.shard_layout.MemoryShardLayout.sync_grads``.

Ranks may hold different token counts (e.g. the last validation batch): counts are exchanged first
(one tiny all-gather of P int64s) and every rank pads to the largest with weight-0 bags, so all ranks
run identical collectives. Every rank must call ``read`` the same number of times in the same order.

Imports only torch, like the rest of memlayers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from memlayers.lookup import lookup
from memlayers.pool import MemoryPool

ProcessGroup = dist.ProcessGroup

# torch 2.13 renamed the tensor-form collectives (`*_into_tensor`/`*_tensor` now warn); keep both.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def column_slice(v_dim: int, parts: int, index: int) -> slice:
    """Columns of the value table owned by shard ``index`` of ``parts``; Dv must divide evenly."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"column_slice: need 0 <= index < parts, got index={index}, parts={parts}")
    if v_dim % parts:
        raise ValueError(
            f"memory values of width v_dim={v_dim} cannot be split into {parts} equal column shards: "
            f"choose parallel.memory dividing {v_dim} (or a memory.v_dim divisible by {parts})"
        )
    width = v_dim // parts
    return slice(index * width, (index + 1) * width)


# ---------------------------------------------------------------------------------------------
# Collectives with autograd


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (rank order); backward reduce-scatters (sums) the gradient back."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0: chunk j goes to rank j. Its own adjoint."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def gather_rows(x: Tensor, group: ProcessGroup) -> Tensor:
    """All-gather along dim 0 in rank order, without autograd."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather(out, x.contiguous(), group=group)
    return out


def _token_counts(n: int, device: torch.device, group: ProcessGroup) -> list[int]:
    return gather_rows(torch.tensor([n], dtype=torch.int64, device=device), group).tolist()


# ---------------------------------------------------------------------------------------------
# The sharded read


def sharded_lookup(
    shard: Tensor,
    indices: Tensor,
    weights: Tensor,
    group: ProcessGroup,
    *,
    sparse: bool = False,
    impl: str = "auto",
) -> Tensor:
    """Full-width weighted bag read for this rank's tokens from a column-sharded value table.

    Args:
        shard:   (N_slots, Dv/P) this rank's columns of the table (rank r of ``group`` holds slice r).
        indices: (T, K) slot ids of this rank's tokens.
        weights: (T, K) float weights.
        group:   the memory-parallel process group (P ranks).

    Returns:
        (T, Dv) in ``shard.dtype``, equal to ``lookup(full_values, indices, weights)``.
    """
    if indices.dim() != 2 or weights.shape != indices.shape:
        raise ValueError(
            f"sharded_lookup: indices and weights must both be (T, K), got {tuple(indices.shape)} and "
            f"{tuple(weights.shape)}"
        )
    P = dist.get_world_size(group)
    T, K = indices.shape
    width = shard.shape[1]
    counts = _token_counts(T, indices.device, group)
    t_max = max(counts)
    if t_max == 0:  # every rank is empty: no collective below would move anything
        return weights.new_zeros((0, width * P), dtype=shard.dtype) + 0 * weights.sum()
    if t_max > T:  # pad with weight-0 bags on slot 0: they read zeros and get zero gradient
        indices = torch.cat([indices, indices.new_zeros((t_max - T, K))])
        weights = torch.cat([weights, weights.new_zeros((t_max - T, K))])
    # Slot ids fit int32 for any table below 2^31 slots: half the bytes on the wire.
    idx_wire = indices.to(torch.int32) if shard.shape[0] < 2**31 else indices
    all_idx = gather_rows(idx_wire, group).to(indices.dtype)  # (P*t_max, K)
    all_w = _GatherRows.apply(weights, group)  # (P*t_max, K), grads reduce-scattered to owners
    part = lookup(shard, all_idx, all_w, sparse=sparse, impl=impl)  # (P*t_max, Dv/P)
    # Row block j holds rank j's tokens: send it to rank j; receive my tokens' column slice from each.
    mine = _AllToAll.apply(part, group)  # (P*t_max, Dv/P), block i = columns of slice i
    read = mine.view(P, t_max, width).transpose(0, 1).reshape(t_max, P * width)
    return read[:T]


class ShardedMemoryPool(MemoryPool):
    """A :class:`MemoryPool` whose ``values`` parameter is this rank's (N*N, Dv/P) column shard.

    ``v_dim`` stays the full logical width (what ``read`` returns), so memory layers built for the full
    pool work unchanged. Build one from an existing pool with :meth:`from_pool`, or swap every pool of a
    model with :func:`shard_memory_pools`.
    """

    def __init__(
        self,
        n_keys: int,
        v_dim: int,
        group: ProcessGroup,
        *,
        sparse_grad: bool = False,
        lookup_impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "ShardedMemoryPool needs torch.distributed initialised (a memory-parallel group)"
            )
        parts, index = dist.get_world_size(group), dist.get_rank(group)
        cols = column_slice(v_dim, parts, index)
        # Skip MemoryPool.__init__: it would allocate the full table, which is what sharding avoids.
        nn.Module.__init__(self)
        if not isinstance(n_keys, int) or n_keys < 1:
            raise ValueError(f"ShardedMemoryPool: n_keys must be a positive int, got {n_keys!r}")
        self.n_keys, self.v_dim, self.n_slots = n_keys, v_dim, n_keys * n_keys
        self.sparse_grad, self.lookup_impl, self.track_usage = sparse_grad, lookup_impl, False
        self.group, self.shard_index, self.num_shards, self.columns = group, index, parts, cols
        self.values = nn.Parameter(
            torch.empty(self.n_slots, cols.stop - cols.start, device=device, dtype=dtype)
        )
        self.register_buffer("usage_counts", None, persistent=False)
        self.reset_parameters()
        # torch.compile leaves the sharded read out of the compiled region (a graph break on each side):
        # its token counts are data-dependent and its collectives are autograd Functions dynamo cannot
        # trace. The lookup kernel inside it runs eagerly, as do the collectives; the rest of the
        # block compiles. Wrapped here, not at import, because the wrapper imports torch._dynamo.
        self._read = torch.compiler.disable(sharded_lookup)

    @classmethod
    def from_pool(cls, pool: MemoryPool, group: ProcessGroup) -> ShardedMemoryPool:
        """This rank's shard of ``pool``: its column slice copied (so P ranks together hold exactly the
        table a single process would), or a meta-device shard when ``pool`` lives on the meta device
        (materialise it with ``to_empty`` and initialise it afterwards: nothing full-size is allocated)."""
        device = pool.values.device
        new = cls(pool.n_keys, pool.v_dim, group, sparse_grad=pool.sparse_grad, lookup_impl=pool.lookup_impl,
                  device=device, dtype=pool.values.dtype)  # fmt: skip
        if not pool.values.is_meta:
            with torch.no_grad():
                new.values.copy_(pool.values[:, new.columns])
        new.values.requires_grad_(pool.values.requires_grad)
        new.track_usage = pool.track_usage
        return new

    def read(self, indices: Tensor, weights: Tensor) -> Tensor:
        if self.track_usage:
            self._count(indices)  # this rank's own tokens only, as with an unsharded pool
        return self._read(
            self.values, indices, weights, self.group, sparse=self.sparse_grad, impl=self.lookup_impl
        )

    @torch.no_grad()
    def full_values(self) -> Tensor:
        """The whole (N*N, Dv) table, all-gathered in the group (every group rank must call this)."""
        return gather_columns(self.values, self.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, columns={self.columns.start}:{self.columns.stop} (shard {self.shard_index}/{self.num_shards})"


@torch.no_grad()
def gather_columns(shard: Tensor, group: ProcessGroup) -> Tensor:
    """Concatenate the group's column shards (rank order) into the full table; no autograd."""
    rows = gather_rows(shard.t().contiguous(), group)  # (P*Dv/P, N) == full.t()
    return rows.t().contiguous()


def shard_memory_pools(model: nn.Module, group: ProcessGroup) -> list[ShardedMemoryPool]:
    """Replace every :class:`MemoryPool` in ``model`` by its shard for this rank, in place.

    Both homes of a pool are rewired: registered submodules (e.g. ``model.memory_pools``) and the plain
    ``pool`` references memory layers keep, so layers that shared a pool share its shard.
    """
    swapped: dict[int, ShardedMemoryPool] = {}

    def shard_of(pool: MemoryPool) -> ShardedMemoryPool:
        if isinstance(pool, ShardedMemoryPool):
            raise ValueError("shard_memory_pools: the model's memory pools are already sharded")
        if id(pool) not in swapped:
            swapped[id(pool)] = ShardedMemoryPool.from_pool(pool, group)
        return swapped[id(pool)]

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MemoryPool):
                setattr(module, name, shard_of(child))
        ref = module.__dict__.get("pool")  # layers keep an unregistered reference (see ProductKeyMemory)
        if isinstance(ref, MemoryPool):
            object.__setattr__(module, "pool", shard_of(ref))
    return list(swapped.values())
