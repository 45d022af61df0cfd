"""Safetensors files of tied models (grown ScaleNet stacks): one stored tensor per tie, ties restored on load.

safetensors refuses tensors that share memory, so a grown model's ``state_dict()`` (every alias of a tied
block listed) cannot be written as is. :mod:`scalenet.tied_state` keeps one name per tie and fans it back
out on load; this module adds only the file IO, which lives here because scalenet imports nothing but torch.
"""

from __future__ import annotations

import os

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from scalenet.tied_state import load_unique_state_dict, unique_state_dict

__all__ = ["load_unique", "save_unique"]


def save_unique(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``unique_state_dict(module)`` to a safetensors file."""
    sd = {k: v.detach().contiguous() for k, v in unique_state_dict(module).items()}
    save_file(sd, os.fspath(path), metadata=metadata)


def load_unique(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, str]:
    """Load a file written by :func:`save_unique` into ``module``; returns the file's metadata."""
    load_unique_state_dict(module, load_file(os.fspath(path)), strict=strict)
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})
