"""Hugging Face weight files: one model.safetensors, or numbered shards plus
model.safetensors.index.json (pytorch_model*.bin read too). Read and written with safetensors
directly: nothing is unpickled, and no second in-memory copy of an HF model is built."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _save_file

from launch.runtime.errors import UserError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failure (a full disk, `ulimit -f`) raised as the OSError it
    is, so the command reports it in one line naming the file instead of a Rust error's traceback."""
    try:
        _save_file(tensors, path, metadata=metadata)
    except Exception as e:  # noqa: BLE001 (SafetensorError is not an OSError; only I/O ones are rewrapped)
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, os.strerror(n), path) from None


def parse_size(size: int | str) -> int:
    """Bytes from 123, "500MB", "2GB", "1GiB" (the units `save_pretrained(max_shard_size=)` takes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise UserError(f"max_shard_size={size!r}: expected bytes or a size like 500MB, 2GB, 1GiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_size: int | str) -> list[str]:
    """HF's safetensors layout: one model.safetensors, or numbered shards plus an index when the
    tensors exceed `max_shard_size` (a tensor larger than the limit gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS), metadata=meta)
        return [WEIGHTS]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return files


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of an HF directory: safetensors (single or sharded), else pytorch_model.bin loaded
    with weights_only=True (no code is unpickled)."""
    if (hf_dir / WEIGHTS_INDEX).is_file():
        files = _index_files(hf_dir / WEIGHTS_INDEX)
    elif (hf_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        bins = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise UserError(
                f"{hf_dir} holds no model weights (model.safetensors[.index.json] or pytorch_model*.bin)"
            )
        state: dict[str, torch.Tensor] = {}
        for b in bins:
            try:
                state.update(torch.load(b, map_location="cpu", weights_only=True))
            except Exception as e:  # truncated zip, or a pickle that is more than plain tensors
                raise UserError(
                    f"cannot read {b}: not a complete plain tensor file ({str(e).splitlines()[0][:200]})"
                ) from None
        return state
    state = {}
    for fname in files:
        state.update(read_safetensors(hf_dir / fname))
    return state


def _index_files(index: Path) -> list[str]:
    """The shard files a sharded safetensors index names; a damaged index fails in one line naming it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # torn JSON, not UTF-8, no/odd weight_map
        raise UserError(
            f'cannot read {index}: expected a JSON object with a "weight_map" of tensor name -> shard file '
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    for name in files:
        if not isinstance(name, str) or Path(name).name != name:
            raise UserError(
                f"cannot read {index}: weight_map names {name!r}, expected a file name in {index.parent}"
            )
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or damaged file fails in one line naming it."""
    if not path.is_file():
        raise UserError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # SafetensorError (header/size mismatch), OSError: the file is damaged
        raise UserError(
            f"cannot read {path}: damaged or truncated safetensors file ({str(e).splitlines()[0][:200]})"
        ) from None
