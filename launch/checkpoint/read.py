"""Reading a checkpoint directory: is it intact (manifest), its trainer state, its tensors' names and
shapes against the configured model, and DCP loads through the allowlisted metadata reader. Both
formats are read: DCP (format 2, `state/`) and the single-file format 1 (launch.checkpoint.legacy),
from a local directory or an fsspec URL (launch.checkpoint.storage)."""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import torch
from torch import nn

from launch.checkpoint import legacy, manifest
from launch.checkpoint.atomic import MARKER, committed
from launch.checkpoint.safe_metadata import (
    METADATA_FILE,
    SafeLoadPlanner,
    read_metadata_file,
    safe_reader,
    tensor_entries,
)
from launch.checkpoint.state import canonical_name
from launch.checkpoint.storage import CheckpointPath
from launch.runtime.errors import UserError

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
FORMAT = 2  # trainer_state.json "format": 2 = DCP state/ directory (1 / absent = model.safetensors)


def checkpoint_problem(ckpt: CheckpointPath, part: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with a checkpoint directory (first damaged file), or None when it is intact."""
    if not committed(ckpt):
        return f"{ckpt}: not committed (no {MARKER} marker: its save was cut short, or is still running)"
    if not (ckpt / TRAINER_STATE).is_file():
        return f"{ckpt / TRAINER_STATE}: missing"
    files = manifest.read_manifest(ckpt)
    if files is None:
        return None if (ckpt / legacy.MODEL_FILE).is_file() else f"{ckpt / manifest.MANIFEST_FILE}: missing"
    return manifest.verify(ckpt, files, part)


def usability_problem(ckpt: CheckpointPath, expected: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """What makes a checkpoint whose files match its manifest unusable, or None.

    The manifest only says the files are the ones written; this checks they can be used: a
    trainer_state.json that parses (with a step), a DCP index that the safe reader accepts, every
    shard file the index names present and covered by the manifest (a manifest edited to omit a shard
    verifies otherwise), and, given the configured model's `expected` tensor shapes, tensors that fit
    it (a foreign or differently-configured model put in checkpoints/)."""
    try:
        state = read_trainer_state(ckpt)
        if not isinstance(state.get("step", 0), int):
            return f"{ckpt / TRAINER_STATE}: 'step' is not an integer"
        named = re.fullmatch(r"step_(\d+)", ckpt.name)
        if named and "step" in state and state["step"] != int(named.group(1)):
            # the resume would redo or skip steps against the data order the directory name promises
            return f"{ckpt / TRAINER_STATE}: says step {state['step']}, in a directory named {ckpt.name}"
        if not is_dcp_checkpoint(ckpt):
            return None  # the legacy format carries no manifest or index to cross-check
        index = ckpt / STATE_DIR / METADATA_FILE
        listed = manifest.read_manifest(ckpt) or {}
        for rel in (TRAINER_STATE, f"{STATE_DIR}/{METADATA_FILE}"):
            if rel not in listed:
                return f"{ckpt / rel}: not covered by the manifest"
        meta = read_metadata_file(index)
        storage = getattr(meta, "storage_data", None) or {}
        for info in storage.values():
            rel = f"{STATE_DIR}/{getattr(info, 'relative_path', '')}"
            if rel not in listed:
                return f"{ckpt / rel}: named by {index} but not covered by the manifest (removed or tampered)"
        if expected is not None:
            entries = tensor_entries(meta)
            stored = {k[len("model/") :]: s for k, (s, _) in entries.items() if k.startswith("model/")}
            aliases = checked_aliases(ckpt, state.get("aliases", {}), set(stored))
            check_shapes(
                str(ckpt / STATE_DIR), {k: v for k, v in expected.items() if k not in aliases}, stored
            )
    except UserError as e:
        return str(e)
    return None


def read_trainer_state(ckpt: CheckpointPath) -> dict[str, Any]:
    """trainer_state.json of either format, as a dict; anything else is one line naming the file."""
    path = ckpt / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable checkpoint state {path}: {e}") from None


def checkpoint_steps(ckpt: CheckpointPath) -> int | None:
    """train.steps of the run that wrote `ckpt` (its config.yaml), or None when unknown. Read as
    plain YAML, not through the schema: only this one number is wanted, and an older config with
    keys since renamed must not stop a resume."""
    import yaml

    try:
        steps = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("train", {}).get("steps")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def init_from_line(ckpt: CheckpointPath, state: dict[str, Any], reset_data: bool) -> str:
    """The line `train.init_from` prints: which checkpoint, its step, and what was taken from it
    (weights always; the data position unless train.reset_data; never the optimizer or schedule)."""
    grown = state.get("grown_from")
    origin = (
        f", grown from step {grown.get('step')} of {grown.get('checkpoint')}"
        if isinstance(grown, dict)
        else ""
    )
    consumed = (state.get("data") or {}).get("consumed", "?")
    data = (
        "data stream restarted from the beginning (train.reset_data=true)"
        if reset_data
        else f"data position continued from the checkpoint ({consumed} sequences already read)"
    )
    return (
        f"init_from: loaded weights only from {ckpt} (step {state.get('step', '?')}{origin}); fresh optimizer, "
        f"LR schedule and step counter from 0; {data}"
    )


def is_dcp_checkpoint(ckpt: CheckpointPath) -> bool:
    return (ckpt / STATE_DIR).is_dir()


def checked_aliases(ckpt: CheckpointPath, aliases: Any, known: set[str]) -> dict[str, str]:
    """The alias map of a checkpoint, refusing a tampered one in one line."""
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise UserError(f"{ckpt / TRAINER_STATE}: 'aliases' must map tensor names to tensor names")
    for alias, canon in aliases.items():
        if canon not in known or alias in known:
            raise UserError(
                f"{ckpt / TRAINER_STATE}: alias {alias!r} -> {canon!r} does not match the stored tensors (tampered or damaged)"
            )
    return aliases


def check_shapes(
    source: str, expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]
) -> None:
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


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fail with one line naming the first tensor that does not fit the configured model."""
    own = {canonical_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(source, own, {k: tuple(t.shape) for k, t in state.items()})


def read_model_state(ckpt: CheckpointPath, model: nn.Module) -> None:
    """Load the weights of checkpoint `ckpt` into an unsharded `model` on this process alone,
    whatever world size and layout saved it (DCP assembles the full tensors)."""
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"checkpoint {ckpt} is damaged: {problem}")
    if not is_dcp_checkpoint(ckpt):
        state, _ = legacy.load_model_file(ckpt / legacy.MODEL_FILE)
        check_model_state(model, state, str(ckpt / legacy.MODEL_FILE))
        model.load_state_dict(state)
        return
    meta = read_metadata_file(ckpt / STATE_DIR / METADATA_FILE)
    stored = {k[len("model/") :]: v for k, v in tensor_entries(meta).items() if k.startswith("model/")}
    aliases = checked_aliases(ckpt, read_trainer_state(ckpt).get("aliases", {}), set(stored))
    own = {canonical_name(k): v for k, v in model.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in own.items() if k not in aliases}
    check_shapes(str(ckpt / STATE_DIR), expected, {k: s for k, (s, _) in stored.items()})
    targets = {f"model/{k}": v for k, v in own.items() if k not in aliases}
    dcp_load(targets, ckpt, no_dist=True)


def read_dcp_state(
    path: CheckpointPath, flat: dict[str, torch.Tensor], trainer_state: dict, growing: set[str] = frozenset()
) -> None:
    """Load a DCP checkpoint into the flat state of a live run (launch.checkpoint.state), resharding to
    its layout, after checking names and shapes. Entries in `growing` (optimizer state that grows with
    the step count) are replaced by tensors of their saved length. Collective."""
    meta = read_metadata_file(path / STATE_DIR / METADATA_FILE)
    entries = tensor_entries(meta)
    stored_model = {k[len("model/") :]: s for k, (s, _) in entries.items() if k.startswith("model/")}
    checked_aliases(path, trainer_state.get("aliases", {}), set(stored_model))
    expected = {k[len("model/") :]: tuple(v.shape) for k, v in flat.items() if k.startswith("model/")}
    check_shapes(str(path / STATE_DIR), expected, stored_model)
    missing = sorted(k for k in flat if k not in entries)
    if missing:
        raise UserError(
            f"{path / STATE_DIR} has no optimizer state {missing[0]!r}: saved with another optimizer config"
        )
    for key in flat:
        if key in growing and len(entries[key][0]) == flat[key].dim() == 1:
            flat[key] = torch.empty(tuple(entries[key][0]), dtype=flat[key].dtype)
        if tuple(flat[key].shape) != tuple(entries[key][0]):
            raise UserError(
                f"{path / STATE_DIR}: {key!r} has shape {entries[key][0]}, expected {tuple(flat[key].shape)}"
            )
    dcp_load(flat, path)


def dcp_load(targets: dict[str, torch.Tensor], ckpt: CheckpointPath, no_dist: bool = False) -> None:
    """DCP load into `targets` in place, never unpickling code; failures are one line naming the directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(
                targets,
                storage_reader=safe_reader(ckpt / STATE_DIR),
                planner=SafeLoadPlanner(allow_partial_load=False),
                no_dist=no_dist,
            )
    except UserError:
        raise
    except (CheckpointException, RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError) as e:
        first = str(e).strip().splitlines()
        raise UserError(
            f"checkpoint {ckpt / STATE_DIR} could not be read ({first[-1] if first else type(e).__name__})"
        ) from None
