"""The shared value table of product-key memory layers.

A ``MemoryPool`` owns ``values`` (N*N slots of width Dv). Every memory layer that shares the table
holds a reference to the same pool object; there is no global or class state, so two models in one
process never interfere. All reads go through ``MemoryPool.read`` so the sharded pool (values split
by embedding dim across memory-parallel ranks) can replace exactly that one method.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memlayers.hugepages import advise_huge_pages
from memlayers.lookup import lookup


class MemoryPool(nn.Module):
    """Value table for product-key memory: ``values`` is an (n_keys**2, v_dim) parameter.

    Args:
        n_keys: sub-keys per half (N); the table has N*N slots.
        v_dim:  value width Dv.
        sparse_grad: produce sparse (row) gradients for ``values`` (CPU: much faster backward; needs a
            sparse-capable optimizer for the values, e.g. ``torch.optim.SparseAdam``).
        lookup_impl: forwarded to :func:`memlayers.lookup` ("auto" | "torch" | "cpu" | "triton").

    Usage statistics: set ``pool.track_usage = True`` and every ``read`` adds its slot ids to a
    non-persistent int64 counter (allocated on first use, so a pool that never tracks pays nothing);
    ``pool.usage_stats()`` summarises and (by default) resets it.
    """

    def __init__(
        self,
        n_keys: int,
        v_dim: int,
        *,
        sparse_grad: bool = False,
        lookup_impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(n_keys, int) or n_keys < 1:
            raise ValueError(f"MemoryPool: n_keys must be a positive int, got {n_keys!r}")
        if not isinstance(v_dim, int) or v_dim < 1:
            raise ValueError(f"MemoryPool: v_dim must be a positive int, got {v_dim!r}")
        self.n_keys = n_keys
        self.v_dim = v_dim
        self.n_slots = n_keys * n_keys
        self.sparse_grad = sparse_grad
        self.lookup_impl = lookup_impl
        self.track_usage = False
        self.values = nn.Parameter(torch.empty(self.n_slots, v_dim, device=device, dtype=dtype))
        advise_huge_pages(self.values)  # random rows of a large table: 2 MiB pages (memlayers.hugepages)
        # Registered (so .to()/.to_empty() move it) but empty until tracking is switched on.
        self.register_buffer("usage_counts", None, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """values ~ N(0, std), std defaults to Dv**-0.5. Works after ``to_empty`` (meta-device build)."""
        std = self.v_dim**-0.5 if std is None else std
        with torch.no_grad():
            nn.init.normal_(self.values, mean=0.0, std=std)
        if self.usage_counts is not None:
            self.usage_counts = None

    def init_weights(self, std: float | None = None) -> None:
        """torchtitan-style alias of :meth:`reset_parameters`."""
        self.reset_parameters(std)

    def init_spec(self) -> dict[str, tuple]:
        """The distribution of each parameter, by name relative to this module: what
        :meth:`reset_parameters` draws, declared so that a trainer can draw it shard by shard with
        its own generators (``("normal", mean, std)``, ``("uniform", low, high)``, ``("constant", c)``)."""
        return {"values": ("normal", 0.0, self.v_dim**-0.5)}

    def read(self, indices: Tensor, weights: Tensor) -> Tensor:
        """Weighted bag read: (B, K) slot ids and (B, K) weights -> (B, Dv) in the values' dtype.

        The single entry point to the table: the sharded pool overrides this method only.
        """
        if self.track_usage:
            self._count(indices)
        return lookup(self.values, indices, weights, sparse=self.sparse_grad, impl=self.lookup_impl)

    @torch.no_grad()
    def _count(self, indices: Tensor) -> None:
        counts = self.usage_counts
        if counts is None or counts.device != indices.device:
            counts = torch.zeros(self.n_slots, dtype=torch.int64, device=indices.device)
            self.usage_counts = counts
        flat = indices.reshape(-1).to(torch.int64)
        counts.index_add_(0, flat, torch.ones_like(flat))

    @torch.no_grad()
    def usage_stats(self, reset: bool = True) -> dict[str, float]:
        """Summary of slot reads since the last reset.

        Returns:
            ``mem_slots_read_frac``: fraction of the N*N slots read at least once.
            ``mem_usage_entropy``: Shannon entropy of the read distribution normalised by log(N*N),
                so 1.0 means perfectly uniform use of the whole table and 0.0 one slot (or no reads).
            ``mem_reads``: number of slot reads counted (H*K per token per layer sharing the pool).

        Under data parallelism each rank counts its own reads; all-reduce ``usage_counts`` first for
        global numbers.
        """
        counts = self.usage_counts
        if counts is None or int(counts.sum()) == 0:
            stats = {"mem_slots_read_frac": 0.0, "mem_usage_entropy": 0.0, "mem_reads": 0.0}
        else:
            total = counts.sum()
            p = counts[counts > 0].double() / total.double()
            entropy = float(-(p * p.log()).sum())
            norm = math.log(self.n_slots) if self.n_slots > 1 else 1.0
            stats = {
                "mem_slots_read_frac": float((counts > 0).sum()) / self.n_slots,
                "mem_usage_entropy": entropy / norm,
                "mem_reads": float(total),
            }
        if reset and counts is not None:
            counts.zero_()
        return stats

    def extra_repr(self) -> str:
        return f"n_keys={self.n_keys}, v_dim={self.v_dim}, n_slots={self.n_slots}, sparse_grad={self.sparse_grad}"
