"""What a checkpoint holds, as one flat dict of tensors: model tensors under `model/<name>`, optimizer
tensors under `optim<i>/<param name>/<stat>`, every sharded tensor a DTensor, each tied tensor once under
its canonical name (the others recorded as aliases). DCP saves this dict and loads into it in place."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launch.checkpoint.collectives import all_ranks

# {parameter name: (process group, dim, full shape)}: parameters stored as plain local slices that
# checkpoints must see as sharded (memory-value column shards; hand-split tensor-parallel weights).
LocalShards = dict[str, tuple[Any, int, tuple[int, ...]]]


def canonical_name(name: str) -> str:
    """A parameter's name without the prefixes wrappers add (DDP's `module.`, torch.compile's
    `_orig_mod.`, activation checkpointing's), so checkpoints do not depend on how a run was wrapped."""
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def alias_map(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for every parameter/buffer name that refers to an already-seen tensor."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if id(t) in canonical:
            aliases[name] = canonical[id(t)]
        else:
            canonical[id(t)] = name
    return aliases


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor; a plain tensor is its own."""
    return t.to_local() if hasattr(t, "to_local") else t


class StateAdapter:
    """How the checkpointer gets and puts a parallelized model's and optimizers' state dicts, with
    every sharded tensor a DTensor (FSDP2 shards and DTensor TP weights already are). This default
    uses torch's `get/set_model_state_dict` and wraps the plain local slices named in `local_shards`
    as DTensors of their logical shape; launch.distributed.parallelize provides one built from its mesh."""

    def __init__(self, local_shards: LocalShards | None = None):
        self.specs = dict(local_shards or {})
        self._meshes: dict[int, Any] = {}

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {k: self._wrap(k, v, None) for k, v in get_model_state_dict(model).items()}

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, {k: self._unwrap(k, v) for k, v in state.items()})

    def optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, opt)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        # New dicts: the per-parameter dicts torch returns are the optimizer's live `opt.state[p]`.
        osd["state"] = {
            name: {
                stat: self._wrap(name, v, shapes.get(name)) if isinstance(v, torch.Tensor) else v
                for stat, v in stats.items()
            }
            for name, stats in osd["state"].items()
        }
        return osd

    def load_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, osd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {
            name: {stat: self._unwrap(name, v) for stat, v in stats.items()}
            for name, stats in osd["state"].items()
        }
        set_optimizer_state_dict(model, opt, {**osd, "state": state})

    def _wrap(self, name: str, t: torch.Tensor, param_shape: tuple[int, ...] | None) -> torch.Tensor:
        spec = self.specs.get(canonical_name(name))
        if spec is None or hasattr(t, "to_local") or t.dim() == 0:
            return t
        if param_shape is not None and tuple(t.shape) != tuple(param_shape):
            return t  # a statistic of a sharded parameter that does not have its shape
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        group, dim, full = spec
        if id(group) not in self._meshes:
            self._meshes[id(group)] = DeviceMesh.from_group(group, t.device.type)
        full = tuple(full)
        stride = torch.empty(full, device="meta").stride()
        return DTensor.from_local(
            t, self._meshes[id(group)], [Shard(dim)], run_check=False, shape=full, stride=stride
        )

    def _unwrap(self, name: str, t: Any) -> Any:
        return local_part(t) if canonical_name(name) in self.specs and isinstance(t, torch.Tensor) else t


def flat_state(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], adapter: StateAdapter
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor], list[dict]]:
    """(flat tensors keyed model/<name> and optim<i>/<name>/<stat>, aliases, model state, optimizer
    state dicts). Each tied tensor is kept once (under its first name; the others are aliases).

    The tensors share storage with the live model and optimizers, so DCP loads into them in place."""
    model_state = adapter.model_state(model)
    aliases = {canonical_name(k): canonical_name(v) for k, v in alias_map(model).items()}
    flat = {f"model/{k}": v for k, v in model_state.items() if k not in aliases}
    optim_states = []
    for i, opt in enumerate(optimizers):
        osd = adapter.optimizer_state(model, opt)
        optim_states.append(osd)
        for name, stats in osd["state"].items():
            for stat, v in stats.items():
                if isinstance(v, torch.Tensor):
                    flat[f"optim{i}/{name}/{stat}"] = v
    return flat, aliases, model_state, optim_states


def nonfinite_entry(flat: dict[str, torch.Tensor]) -> str | None:
    """The first saved tensor (on any rank) holding inf/NaN, or None. Collective."""
    bad = None
    for key, t in flat.items():
        local = local_part(t)
        # In chunks: isfinite over a whole 2 GiB table allocates ~1.75x its size in temporaries.
        if local.is_floating_point() and not all(
            bool(torch.isfinite(c).all()) for c in local.reshape(-1).split(1 << 22)
        ):
            bad = key
            break
    found = [b for b in all_ranks(bad) if b]
    return found[0] if found else None
