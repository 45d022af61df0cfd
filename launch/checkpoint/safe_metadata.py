"""Read `torch.distributed.checkpoint` directories without ever unpickling code.

torch 2.13's `FileSystemReader.read_metadata` reads the `.metadata` file with a plain `pickle.load`,
and `DefaultLoadPlanner.load_bytes` reads non-tensor entries with `torch.load(weights_only=False)`:
a crafted checkpoint could run code at either point. `SafeFileSystemReader` unpickles `.metadata`
through an allowlist of DCP's own metadata classes (plus torch dtypes/sizes/layouts), and
`SafeLoadPlanner` loads non-tensor entries with `weights_only=True` (our checkpoints hold none).
Tensor payloads are already read by DCP with `torch.load(weights_only=True)`. `safe_reader` picks
the reader for a local directory or an fsspec URL (launch.checkpoint.storage); both read `.metadata`
through the same allowlist.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from launch.checkpoint.storage import CheckpointPath, FsspecPath, as_path
from launch.runtime.errors import UserError

METADATA_FILE = ".metadata"

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch._utils": {"_get_layout"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


def read_metadata_file(path: CheckpointPath | str) -> Metadata:
    """The DCP `Metadata` in `path` (local or fsspec), or a one-line UserError (crafted, truncated, missing)."""
    path = as_path(path)
    try:
        with path.open("rb") as f:
            meta = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: not a complete checkpoint") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"{path} is not a plain checkpoint metadata file ({e})") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise UserError(f"{path} is not a plain checkpoint metadata file (unexpected content)")
    return meta


class _SafeMetadata:
    """DCP reader mixin: metadata read through the allowlisted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        meta = read_metadata_file(as_path(self._get_metadata_path(rank)))
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """`FileSystemReader` (a local directory) whose metadata is read through the allowlisted unpickler."""


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    """`FsspecReader` (an fsspec URL) whose metadata is read through the allowlisted unpickler."""


def safe_reader(directory: CheckpointPath) -> FileSystemReader:
    """The allowlisted DCP reader of a state directory, local or behind an fsspec URL."""
    if isinstance(directory, FsspecPath):
        return SafeFsspecReader(str(directory))
    return SafeFileSystemReader(directory)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are read with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 (any unpickling failure is the same user-facing error)
            raise UserError(
                f"checkpoint entry {read_item.dest_index.fqn} is not a plain tensor file ({e})"
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def tensor_entries(meta: Metadata) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (global shape, dtype)} of every tensor entry in a DCP checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for key, m in meta.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            out[key] = (tuple(m.size), m.properties.dtype)
    return out
