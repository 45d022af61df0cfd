"""Tied state: which state-dict names share a tensor, one stored name per tie, every tie restored on load.

``module.state_dict()`` lists a tied tensor under every name that reaches it (``0.attention.wq.weight``
and ``4.attention.wq.weight`` for a block used at positions 0 and 4). safetensors refuses tensors that
share memory, and storing each alias would duplicate the bytes. :func:`unique_state_dict` keeps the
first name per storage; :func:`load_unique_state_dict` fans that tensor back out to every alias and
loads with ``copy_`` into the existing tensors, so ties (same ``nn.Parameter`` objects) survive.

Pure torch: writing such a state dict to a file is the caller's business (launch.checkpoint.tied_safetensors does it
with safetensors).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scalenet.params import storage_key

__all__ = ["alias_groups", "load_unique_state_dict", "unique_state_dict"]


def alias_groups(module: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the storage they refer to, in state-dict order (first = stored name)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        groups.setdefault(storage_key(t), []).append(name)
    return list(groups.values())


def unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with one entry per shared storage (the first name in state-dict order).

    Tensors that overlap a storage without being the same view (rare: slices of one buffer) are cloned
    so the result never holds aliased memory.
    """
    sd = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen_keys: set[tuple] = set()
    seen_ptrs: set[tuple] = set()
    for name, t in sd.items():
        key = storage_key(t)
        if key in seen_keys:
            continue
        seen_keys.add(key)
        ptr = key[:2] if key[0] != "id" else key
        if ptr in seen_ptrs:
            t = t.clone()  # a different view into memory already stored
        seen_ptrs.add(ptr)
        out[name] = t
    return out


def load_unique_state_dict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> Any:
    """Load a (deduplicated) state dict into ``module``: any one alias of a tied tensor is enough.

    Every alias is filled from the stored name, and loading copies into the existing tensors, so tied
    parameters stay the same objects. Returns ``load_state_dict``'s (missing_keys, unexpected_keys).
    """
    full: dict[str, torch.Tensor] = {}
    missing_groups: list[list[str]] = []
    for names in alias_groups(module):
        present = [n for n in names if n in state_dict]
        if not present:
            missing_groups.append(names)
            continue
        src = state_dict[present[0]]
        for other in present[1:]:
            if state_dict[other].shape != src.shape or not torch.equal(state_dict[other], src):
                raise ValueError(
                    f"state_dict holds tied names {present[0]!r} and {other!r} with different values; "
                    "they refer to one tensor in the module, so they must agree"
                )
        for n in names:
            full[n] = src
    if strict and missing_groups:
        shown = "; ".join(
            g[0] + (f" (or an alias: {', '.join(g[1:])})" if len(g) > 1 else "") for g in missing_groups[:10]
        )
        # RuntimeError like torch's own load_state_dict, so callers catch one type.
        raise RuntimeError(f"state_dict is missing {len(missing_groups)} tensors: {shown}")
    known = {n for g in alias_groups(module) for n in g}
    full.update({k: v for k, v in state_dict.items() if k not in known})  # unexpected: let torch report
    return module.load_state_dict(full, strict=strict)
