"""Merge a grown stack into independent plain blocks (for export as an ordinary deeper model).

Position l' becomes a deep copy of its block with every adapted linear folded:
    W'_{l'} = W_{g(l')} + s · B_{l'} A_{l'}      (b unchanged)
so the merged stack computes exactly what the grown one does, with no tensor shared between
positions (and the per-position parameter count of a plain model). Objects referenced but not
registered by a block (a memory layer's value pool, owned by the model) stay shared.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from scalenet.adapter import AdaptedLinear
from scalenet.copying import shared_deepcopy
from scalenet.grow import as_block_list, set_submodule


def merge_block(block: nn.Module, shared_objects: Iterable[Any] = ()) -> nn.Module:
    """An independent copy of one position, each AdaptedLinear replaced by a plain folded nn.Linear."""
    out = shared_deepcopy(block, shared_objects)  # fresh tensors; external refs (pool) kept
    folded: dict[int, nn.Linear] = {}  # a linear registered under two names stays one module
    for name, mod in list(out.named_modules(remove_duplicate=False)):
        if isinstance(mod, AdaptedLinear):
            if id(mod) not in folded:
                folded[id(mod)] = mod.merged()
            set_submodule(out, name, folded[id(mod)])
    return out


def merge(new_layers: nn.ModuleList, shared_objects: Iterable[Any] = ()) -> nn.ModuleList:
    """Independent plain blocks computing the same function as ``new_layers``; nothing shared.

    Works on any stack (grown, copied, or plain): positions without adapters are just deep-copied.
    """
    blocks = as_block_list(new_layers, "new_layers")
    shared = list(shared_objects)
    return nn.ModuleList(merge_block(b, shared) for b in blocks)
