"""Atomic checkpoint directories, one protocol on every store (launch.checkpoint.storage):

1. the files are written into a staging directory (`staging_dir`): a hidden temporary sibling on a
   local path, the final place itself behind an fsspec URL (object stores have no rename);
2. the manifest is written (by the caller), then every file is flushed and the commit marker
   `COMMITTED` is written last (`publish`);
3. on a local path the directory is renamed into place.

A step directory counts as a checkpoint once committed (`committed`): renamed into place on a local
path (checkpoints of earlier versions have no marker), holding the marker behind a URL. A crash at
any point leaves the previous checkpoints untouched and the new one uncommitted: a `.tmp_step_*`
directory, or a `step_N/` without its marker, which readers ignore and the next run removes.
Removal (`remove`) takes the marker first, so a removal cut short leaves an uncommitted directory,
never a committed one with files missing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from launch.checkpoint.storage import CheckpointPath, fsync_tree, renames, rmtree, sync_tree
from launch.runtime.errors import UserError, causes, describe_os_error, root_cause

MARKER = "COMMITTED"  # written last: its presence commits a checkpoint directory


def staging_dir(root: CheckpointPath, name: str) -> CheckpointPath:
    """Where the directory `root/name` is assembled: a hidden temporary sibling where it will be renamed
    into place, the final place itself on a store that cannot rename."""
    return root / f".tmp_{name}_{os.getpid()}" if renames(root) else root / name


def committed(directory: CheckpointPath) -> bool:
    """Whether a checkpoint directory has been committed (see the module docstring)."""
    return renames(directory) or (directory / MARKER).is_file()


def remove(directory: CheckpointPath) -> None:
    """Uncommit, then remove, a checkpoint directory."""
    if not renames(directory):
        (directory / MARKER).unlink(missing_ok=True)
    rmtree(directory)


def publish(staging: CheckpointPath, final: CheckpointPath, marker: dict) -> None:
    """Commit a complete staging directory (manifest already written): flush, write the marker, and
    rename it to `final` where the store can."""
    if renames(staging):
        mark(staging, marker)
        commit_directory(staging, final)
    else:
        sync_tree(staging)  # the marker must never be durable before the files it vouches for
        mark(staging, marker)


def mark(directory: CheckpointPath, marker: dict) -> None:
    """Write the commit marker into a complete, flushed `directory`, and flush it."""
    (directory / MARKER).write_text(json.dumps(marker) + "\n")
    sync_tree(directory)


def commit_directory(tmp: Path, final: Path) -> None:
    """Rename a complete `tmp` to `final`, replacing an existing `final` only once `tmp` is in place."""
    fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    try:  # the rename itself is durable only once the parent directory is flushed
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def write_failure(final: Path, e: BaseException) -> UserError:
    """One line naming the file, the reason and the errno a checkpoint write failed with (disk full,
    quota, EFBIG), whatever wrapped it: DCP's CheckpointException is unwrapped to its OSError."""
    cause = root_cause(e)
    if isinstance(cause, OSError):
        what = describe_os_error(cause) if cause.filename else f"{final}: {describe_os_error(cause)}"
    else:
        # No errno: torch's file writer reports a short write as "unexpected pos N vs M". Say the first
        # rank's own error (not DCP's "CheckpointException ranks:...") and what the short write meets.
        cause = next((c for c in causes(e) if type(c).__name__ != "CheckpointException"), cause)
        lines = str(cause).strip().splitlines()
        what = f"{final}: {lines[0] if lines else type(cause).__name__}"
        if hint := short_write_hint(final):
            what += f"; {hint}"
    return UserError(f"cannot write checkpoint {final} ({what}); the previous checkpoints are kept")


def short_write_hint(path) -> str | None:
    """What a write that stopped short most likely met, where no errno says it: the file-size limit
    (`ulimit -f`) or a nearly full filesystem. None when neither applies (or `path` is a URL)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"File too large (EFBIG)? files are limited to {soft:,} bytes here (ulimit -f)"
    place = Path(str(path))
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return None
    if free < 256 * 2**20:
        return f"No space left on device (ENOSPC)? {free:,} bytes free on its filesystem"
    return None


def is_write_error(e: BaseException) -> bool:
    """What a failed checkpoint write raises: an OSError, torch.save's RuntimeError for a short write,
    or DCP's CheckpointException (a BaseException, so `except Exception` misses it)."""
    return isinstance(e, OSError | RuntimeError) or type(e).__name__ == "CheckpointException"
