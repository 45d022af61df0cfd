"""Atomic checkpoint directories: a directory is filled under a temporary name and renamed into place
only when complete and flushed, so a crash mid-write leaves the previous checkpoint untouched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from launch.runtime.errors import UserError, describe_os_error, root_cause


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk: a rename must never publish data still in the page cache."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


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
        lines = str(cause).strip().splitlines()
        what = f"{final}: {lines[0] if lines else type(cause).__name__}"
    return UserError(f"cannot write checkpoint {final} ({what}); the previous checkpoints are kept")


def is_write_error(e: BaseException) -> bool:
    """What a failed checkpoint write raises: an OSError, torch.save's RuntimeError for a short write,
    or DCP's CheckpointException (a BaseException, so `except Exception` misses it)."""
    return isinstance(e, OSError | RuntimeError) or type(e).__name__ == "CheckpointException"
