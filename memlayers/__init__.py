"""memlayers: product-key memory layers with a shared value pool and fast lookup kernels.

    from memlayers import MemoryPool, ProductKeyMemory, lookup

Imports only torch (triton optionally, on first use of the Triton lookup).
"""

from memlayers.lookup import lookup
from memlayers.memory import ProductKeyMemory
from memlayers.pool import MemoryPool

__all__ = ["MemoryPool", "ProductKeyMemory", "lookup"]
