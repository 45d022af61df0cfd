"""Moved: :class:`memlayers.shard_layout.MemoryShardLayout` (renamed from ``MemoryLayout`` so it is not
confused with launch's layouts). This module keeps the old import path working."""

from memlayers.shard_layout import MemoryShardLayout

MemoryLayout = MemoryShardLayout

__all__ = ["MemoryLayout", "MemoryShardLayout"]
