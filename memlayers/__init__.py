"""memlayers: product-key memory layers with a shared value pool and fast lookup kernels.

    from memlayers import MemoryPool, ProductKeyMemory, lookup

Imports only torch (triton optionally, on first use of the Triton lookup; the C++ CPU kernels are
built on first use, see memlayers.native).
"""

from __future__ import annotations

from memlayers.lookup import lookup
from memlayers.memory import ProductKeyMemory
from memlayers.optim import RowSparseAdam, RowwiseAdam
from memlayers.pool import MemoryPool
from memlayers.query_batchnorm import QueryBatchNorm, set_query_norm_group

__all__ = [
    "MemoryPool",
    "ProductKeyMemory",
    "QueryBatchNorm",
    "RowSparseAdam",
    "RowwiseAdam",
    "lookup",
    "set_query_norm_group",
]
