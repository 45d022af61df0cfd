"""The single-file checkpoint format of earlier versions (format 1, before DCP), read by converting on read:

    step_N/
        model.safetensors     weights; a tensor shared by several names (tied embeddings, ScaleNet
                              blocks) stored once, its other names recorded as `aliases` metadata
        optimizer.pt          a list, one per optimizer, of {"state": {param name: {stat: tensor}}, ...}
                              (plain tensors; loaded with weights_only=True)
        trainer_state.json    step, tokens seen, data-stream position (no "format" key)
        rng.pt, config.yaml, tokenizer.model

Such directories carry no manifest. Nothing writes this format any more except `save_model_file`,
kept as the one writer of its weights file (tests build format-1 checkpoints with it)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from launch.checkpoint.state import alias_map, canonical_name, local_part
from launch.checkpoint.storage import CheckpointPath, local_copy
from launch.runtime.errors import UserError

MODEL_FILE = "model.safetensors"


def save_model_file(
    model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None, metadata: dict | None = None
) -> None:
    """Write the model's state (or `state`, a full state dict of it) with each shared tensor once."""
    aliases = {canonical_name(k): canonical_name(v) for k, v in alias_map(model).items()}
    state = state if state is not None else model.state_dict()
    tensors = {}
    for name, t in state.items():
        name = canonical_name(name)
        if name not in aliases:
            tensors[name] = t.detach().to("cpu").contiguous()
    meta = {"aliases": json.dumps(aliases), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(path), metadata=meta)


def load_model_file(path: CheckpointPath) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The full state dict (aliases filled in, pointing at the same tensor) and the file's metadata."""
    if not path.is_file():
        raise UserError(f"no model weights at {path}")
    try:
        with safe_open(str(local_copy(path)), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for bad headers/lengths)
        raise UserError(
            f"{path} is damaged or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
        for alias, canon in aliases.items():
            state[alias] = state[canon]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError(
            f"{path}: its 'aliases' metadata does not match the stored tensors (tampered or damaged)"
        ) from None
    return state, meta


def read_plain_tensors(path: CheckpointPath) -> Any:
    """torch.load with weights_only=True; a crafted or damaged file is one line naming it."""
    try:
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: not a complete checkpoint") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a plain tensor file ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{path} is damaged or truncated ({str(e).splitlines()[0]})") from None


def full_state(path: CheckpointPath, n_optimizers: int) -> dict[str, torch.Tensor]:
    """A single-file (format 1) checkpoint as flat full tensors under the DCP keys (convert on read)."""
    state, _ = load_model_file(path / MODEL_FILE)
    flat = {f"model/{k}": v for k, v in state.items()}
    if not n_optimizers:
        return flat
    opt_path = path / "optimizer.pt"
    opt_states = read_plain_tensors(opt_path)
    if not isinstance(opt_states, list) or len(opt_states) != n_optimizers:
        raise UserError(
            f"{opt_path}: expected a list of {n_optimizers} optimizer states (saved with another optimizer config?)"
        )
    for i, osd in enumerate(opt_states):
        for name, stats in (osd.get("state", {}) if isinstance(osd, dict) else {}).items():
            for stat, v in stats.items():
                if isinstance(v, torch.Tensor):
                    flat[f"optim{i}/{name}/{stat}"] = v
    return flat


@torch.no_grad()
def fill_from_full(flat: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's piece of each full tensor into the live (possibly sharded) tensor."""
    for key, target in flat.items():
        if key not in full:
            raise UserError(
                f"checkpoint has no tensor {key!r} (saved with another model or optimizer config)"
            )
        src = full[key]
        if tuple(src.shape) != tuple(target.shape):
            raise UserError(
                f"checkpoint tensor {key!r} has shape {tuple(src.shape)}, the configured run expects {tuple(target.shape)}"
            )
        if hasattr(target, "device_mesh"):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(
                target.shape, target.device_mesh, target.placements
            )
            src = src[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        local_part(target).copy_(src)
