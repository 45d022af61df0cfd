"""Self-contained, atomically written checkpoints.

    run.dir/checkpoints/step_N/
        model.safetensors     weights; a tensor shared by several names (tied embeddings, ScaleNet
                              blocks) is stored once, its other names recorded as aliases
        optimizer.pt          optimizer states keyed by parameter name (plain tensors; loaded with
                              weights_only=True), so they survive a change of world size
        trainer_state.json    step, tokens seen, data-stream position, world size
        rng.pt                this process's RNG states
        config.yaml           the resolved config: every other command needs only this directory
        tokenizer.model

A checkpoint is written into a hidden temporary directory and renamed into place only when
complete, so a crash mid-write leaves the previous checkpoint untouched and loadable. Loading
never unpickles code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from launch.runtime.errors import UserError
from launch.runtime.faults import fault

STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_FILE = "model.safetensors"


def alias_map(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for every parameter/buffer name that refers to an already-seen tensor."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) in canonical:
            aliases[name] = canonical[id(t)]
        else:
            canonical[id(t)] = name
    return aliases


def _unwrap_name(name: str) -> str:
    # Wrappers (DDP's `module.`, torch.compile's `_orig_mod.`, activation checkpointing) add prefixes.
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def save_model_file(model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None, metadata: dict | None = None) -> None:
    """Write the model's state (or `state`, a full state dict of it) with each shared tensor once."""
    aliases = {_unwrap_name(k): _unwrap_name(v) for k, v in alias_map(model).items()}
    state = state if state is not None else model.state_dict()
    tensors = {}
    for name, t in state.items():
        name = _unwrap_name(name)
        if name not in aliases:
            tensors[name] = t.detach().to("cpu").contiguous()
    meta = {"aliases": json.dumps(aliases), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(path), metadata=meta)


def load_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The full state dict (aliases filled in, pointing at the same tensor) and the file's metadata."""
    if not path.is_file():
        raise UserError(f"no model weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for bad headers/lengths)
        raise UserError(f"{path} is damaged or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
        for alias, canon in aliases.items():
            state[alias] = state[canon]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError(f"{path}: its 'aliases' metadata does not match the stored tensors (tampered or damaged)") from None
    return state, meta


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fail with one line naming the first tensor that does not fit the configured model."""
    own = {_unwrap_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(source, own, {k: tuple(t.shape) for k, t in state.items()})


def check_shapes(source: str, expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]) -> None:
    """One line naming the first stored tensor whose shape, or presence, differs from the model's."""
    for name, shape in stored.items():
        if name in expected and tuple(expected[name]) != tuple(shape):
            raise UserError(
                f"{source}: tensor '{name}' has shape {tuple(shape)} but the configured model expects "
                f"{tuple(expected[name])}: the checkpoint was trained with a different model config"
            )
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} does not match the configured model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )


# ---------------------------------------------------------------------------------------------
# Run-directory checkpoints


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    from launch.checkpoint.checkpointer import Checkpointer  # (it builds on this module)

    latest = Checkpointer(p).latest_intact() if checkpoint_dir(p).is_dir() else None
    if latest is not None:
        return latest
    raise UserError(f"no checkpoint at {p} (expected a checkpoints/step_N directory or a run directory holding one)")


@dataclass
class CheckpointPayload:
    """What a rank contributes to a checkpoint; only rank 0's files are written, except `rng`."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]
    config_yaml: str
    tokenizer_path: Path | None


def write_checkpoint(run_dir: str | Path, step: int, payload: CheckpointPayload, model: nn.Module, keep_last: int) -> Path:
    """Write step_N atomically (rank 0) and prune all but the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_file(model, tmp / MODEL_FILE, payload.model_state, metadata={"step": step})
    if fault("crash_in_save", step):
        os.kill(os.getpid(), 9)  # simulates a node dying halfway through the write
    torch.save(payload.optimizer_state, tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "config.yaml").write_text(payload.config_yaml)
    if payload.tokenizer_path is not None:
        shutil.copyfile(payload.tokenizer_path, tmp / "tokenizer.model")
    # trainer_state.json marks a complete checkpoint: written last, inside the temp dir.
    (tmp / "trainer_state.json").write_text(json.dumps(payload.trainer_state, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
        old = root / f".old_step_{step}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for _, p in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # leftovers of crashed writes
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"unreadable checkpoint state {ckpt / 'trainer_state.json'}: {e}") from None


def read_optimizer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)


def read_rng_state(ckpt: Path) -> dict[str, torch.Tensor] | None:
    p = ckpt / "rng.pt"
    return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None
