"""scalenet: grow a network's depth by reusing its blocks' weights plus per-position low-rank adapters.

    from scalenet import grow, merge
    new_layers = grow(layers, depth=None, mapping="stack", adapter_rank=8, targets=None)
    plain = merge(new_layers)

Imports only torch (safetensors is optional, for :func:`save_unique` / :func:`load_unique`).
"""

from scalenet.adapter import AdaptedLinear
from scalenet.checkpoint import (
    alias_groups,
    load_unique,
    load_unique_state_dict,
    save_unique,
    unique_state_dict,
)
from scalenet.copying import external_refs, shared_deepcopy
from scalenet.fsdp import fsdp_units
from scalenet.grow import adapter_parameters, adapters, grow, reset_adapters
from scalenet.mapping import resolve_mapping
from scalenet.materialize import to_empty_tied
from scalenet.merge import merge
from scalenet.params import count_params
from scalenet.strategies import SPEC_FORMAT, STRATEGIES, grow_by_strategy, rebuild, register_strategy

__all__ = [
    "STRATEGIES",
    "SPEC_FORMAT",
    "AdaptedLinear",
    "adapter_parameters",
    "adapters",
    "alias_groups",
    "count_params",
    "external_refs",
    "fsdp_units",
    "grow",
    "grow_by_strategy",
    "load_unique",
    "load_unique_state_dict",
    "merge",
    "rebuild",
    "register_strategy",
    "reset_adapters",
    "resolve_mapping",
    "save_unique",
    "shared_deepcopy",
    "to_empty_tied",
    "unique_state_dict",
]
