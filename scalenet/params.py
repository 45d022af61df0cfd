"""Parameter counting that respects ties."""

from __future__ import annotations

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> tuple:
    """Identifies the memory a tensor occupies: equal keys mean the same elements (a tie)."""
    if t.device.type == "meta" or t.untyped_storage().data_ptr() == 0:
        return ("id", id(t))  # meta/empty tensors have no address: fall back to object identity
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, counting each shared storage once (tied blocks are not double counted)."""
    seen: set[tuple] = set()
    total = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if trainable_only and not p.requires_grad:
            continue
        key = storage_key(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
