"""Per-file checksums of a checkpoint directory: written last before the directory is committed,
verified before a checkpoint is trusted (resume, eval, export), so bit rot or a truncated file is
caught and the newest intact checkpoint is used instead. Paths are local or fsspec
(launch.checkpoint.storage)."""

from __future__ import annotations

import hashlib
import json

from launch.checkpoint import storage
from launch.checkpoint.atomic import MARKER
from launch.checkpoint.storage import CheckpointPath

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 22


def file_digest(path: CheckpointPath) -> dict:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def digest_files(root: CheckpointPath, relative: list[str]) -> dict[str, dict]:
    return {rel: file_digest(root / rel) for rel in relative}


def all_files(root: CheckpointPath) -> list[str]:
    """Every regular file under `root` except the manifest itself and the commit marker (written after
    it), as sorted relative paths."""
    return [rel for rel in storage.files(root) if rel not in (MANIFEST_FILE, MARKER)]


def write_manifest(root: CheckpointPath, files: dict[str, dict]) -> None:
    (root / MANIFEST_FILE).write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))


def read_manifest(root: CheckpointPath) -> dict[str, dict] | None:
    """The recorded {file: {bytes, sha256}}, None when the checkpoint has no manifest (older format)."""
    path = root / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(v, dict) and "sha256" in v and "bytes" in v for v in files.values()):
            raise ValueError("bad entry")
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return {MANIFEST_FILE: {"bytes": -1, "sha256": "unreadable"}}


def verify(
    root: CheckpointPath, files: dict[str, dict] | None = None, part: tuple[int, int] = (0, 1)
) -> str | None:
    """The first problem found (a file and what is wrong with it), or None when intact.

    `part=(i, n)` checks only every n-th file from the i-th, so n ranks can share the work."""
    files = read_manifest(root) if files is None else files
    if files is None:
        return None
    if MANIFEST_FILE in files:
        return f"{root / MANIFEST_FILE}: unreadable manifest"
    names = sorted(files)
    i, n = part
    for rel in names[i::n]:
        path = root / rel
        try:
            if not path.is_file():
                return f"{path}: missing"
            want = files[rel]
            if path.stat().st_size != want["bytes"]:
                return f"{path}: {path.stat().st_size} bytes, expected {want['bytes']} (truncated or overwritten)"
            if file_digest(path)["sha256"] != want["sha256"]:
                return f"{path}: checksum mismatch (corrupted)"
        except OSError as e:  # unreadable, or deleted under us (a pruner racing this reader)
            return f"{path}: unreadable ({e.strerror or e})"
    return None
