"""Moving a tied model off the meta device without untying it.

``Module.to_empty`` (and any ``_apply`` that cannot reuse a parameter's storage, e.g. meta → cpu/cuda)
builds a *new* ``nn.Parameter`` for every module that registers it, so a block reused at two positions
ends up with two unrelated tensors. With ``torch.__future__``'s swap mode, ``_apply`` swaps the new data
into the existing parameter objects instead, so every alias keeps pointing at one parameter.
"""

from __future__ import annotations

import torch
from torch import nn


def to_empty_tied(module: nn.Module, device: torch.device | str, recurse: bool = True) -> nn.Module:
    """``module.to_empty(device=device)`` that keeps tied parameters tied (same objects). Values are
    uninitialised, as with ``to_empty``: initialise or load afterwards."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return module.to_empty(device=device, recurse=recurse)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
