"""memlayers: product-key memory layers with a shared value pool and fast lookup kernels.

    from memlayers import MemoryPool, ProductKeyMemory, lookup

Imports only torch (triton optionally, on first use of the Triton lookup).
"""

from __future__ import annotations

from typing import Any

from memlayers.lookup import lookup
from memlayers.memory import ProductKeyMemory
from memlayers.pool import MemoryPool
from memlayers.query_norm import QueryBatchNorm, set_query_norm_group

__all__ = ["MemoryPool", "ProductKeyMemory", "QueryBatchNorm", "RowSparseAdam", "RowwiseAdam", "lookup", "set_query_norm_group"]


def __getattr__(name: str) -> Any:
    # The optimizer pulls in the CPU kernel module; resolve it on first use so `import memlayers`
    # stays cheap for users who only want the layer.
    if name in ("RowSparseAdam", "RowwiseAdam"):
        from memlayers import row_sparse_adam

        return getattr(row_sparse_adam, name)
    raise AttributeError(f"module 'memlayers' has no attribute {name!r}")
