"""scalenet: grow a network's depth by reusing its blocks' weights plus per-position low-rank adapters.

    from scalenet import grow, merge
    new_layers = grow(layers, depth=None, mapping="stack", adapter_rank=8, targets=None)
    plain = merge(new_layers)

Imports only torch. Tied models' state dicts: :mod:`scalenet.tied_state`; writing them as safetensors
files: ``launch.checkpoint.tied_safetensors``.
"""

from scalenet.adapter import AdaptedLinear
from scalenet.copying import external_refs, shared_deepcopy
from scalenet.fsdp import fsdp_units
from scalenet.grow import adapter_parameters, adapters, grow, reset_adapters
from scalenet.mapping import resolve_mapping
from scalenet.materialize import to_empty_tied
from scalenet.merge import merge
from scalenet.params import count_params
from scalenet.strategies import SPEC_FORMAT, STRATEGIES, grow_by_strategy, rebuild, register_strategy
from scalenet.tied_state import alias_groups, load_unique_state_dict, unique_state_dict

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
    "load_unique_state_dict",
    "merge",
    "rebuild",
    "register_strategy",
    "reset_adapters",
    "resolve_mapping",
    "shared_deepcopy",
    "to_empty_tied",
    "unique_state_dict",
]


def __getattr__(name: str):
    # The safetensors file IO left scalenet (which imports only torch); say where it went.
    if name in ("save_unique", "load_unique"):
        raise AttributeError(f"scalenet.{name} moved to launch.checkpoint.tied_safetensors.{name}")
    raise AttributeError(f"module 'scalenet' has no attribute {name!r}")
