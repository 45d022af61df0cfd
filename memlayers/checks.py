"""Argument checks shared by every lookup path (`lookup`, `lookup_cpu`, the sharded read)."""

from __future__ import annotations

import torch
from torch import Tensor


class LookupInputError(TypeError, ValueError):
    """A malformed lookup argument. A TypeError for wrong dtypes and a ValueError for wrong shapes
    by tradition; one class so callers can catch either."""


def check_lookup_inputs(values: Tensor, indices: Tensor, weights: Tensor, who: str = "lookup") -> None:
    """values (N_slots, Dv) float, indices (B, K) int64/int32, weights (B, K) float."""
    problems = [
        (values.dim() != 2, f"values must be 2-D (N_slots, Dv), got shape {tuple(values.shape)}"),
        (not values.is_floating_point(), f"values must be a float tensor, got {values.dtype}"),
        (indices.dim() != 2, f"indices must be 2-D (B, K), got shape {tuple(indices.shape)}"),
        (
            indices.dtype not in (torch.int64, torch.int32),
            f"indices must be int64 (or int32), got {indices.dtype}",
        ),
        (
            weights.shape != indices.shape,
            f"weights must have the shape of indices {tuple(indices.shape)} (weights shape {tuple(weights.shape)})",
        ),
        (not weights.is_floating_point(), f"weights must be a float tensor, got {weights.dtype}"),
    ]
    for bad, message in problems:
        if bad:
            raise LookupInputError(f"{who}: {message}")
