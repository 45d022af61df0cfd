"""FSDP2 guidance for grown stacks.

Probed on torch 2.13 (CPU/gloo): ``fully_shard`` on two modules that reach the same parameter fails
("Cannot concatenate overlapping meshes"), so positions that share a block must be sharded *together*
(one call with a list of modules) or left to the root's call. :func:`fsdp_units` returns those groups.
Usage (always finish with one root call; wrap DDP/FSDP only after growing, or new adapters are missed):

    for unit in scalenet.fsdp_units(model.layers):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh)
    fully_shard(model, mesh=mesh)

A unit is all-gathered at each use of any of its positions and its gradient reduce-scattered once.
"""

from __future__ import annotations

from torch import nn

from scalenet.grow import as_block_list
from scalenet.params import storage_key


def fsdp_units(new_layers: nn.ModuleList) -> list[list[nn.Module]]:
    """Positions grouped so that no two groups share a parameter (connected components of the
    "shares a tensor" relation), each group in position order, groups ordered by first position."""
    blocks = as_block_list(new_layers, "new_layers")
    parent = list(range(len(blocks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple, int] = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            key = storage_key(p)
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    groups: dict[int, list[nn.Module]] = {}
    for i, b in enumerate(blocks):
        groups.setdefault(find(i), []).append(b)
    # Components enter the dict at their smallest position, so this is already in position order.
    return list(groups.values())
