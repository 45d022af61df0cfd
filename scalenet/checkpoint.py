"""Moved: :mod:`scalenet.tied_state` (the pure-torch part); the safetensors file IO (`save_unique`,
`load_unique`) moved to :mod:`launch.checkpoint.tied_safetensors`. This module keeps the old import path working."""

from scalenet.tied_state import alias_groups, load_unique_state_dict, unique_state_dict

__all__ = ["alias_groups", "load_unique_state_dict", "unique_state_dict"]
