"""Atomic checkpoint directories: a directory is filled under a temporary name and renamed into place
only when complete and flushed, so a crash mid-write leaves the previous checkpoint untouched."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

from launch.runtime.errors import UserError


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
    """One line naming the file and the reason a checkpoint write failed (disk full, quota, EFBIG)."""
    lines = str(e).strip().splitlines()
    reason = getattr(e, "strerror", None) or (lines[0] if lines else type(e).__name__)
    where = getattr(e, "filename", None) or final
    return UserError(
        f"cannot write checkpoint {final} ({where}: {reason}); the previous checkpoints are kept"
    )


def ignore_file_size_signal() -> None:
    """Under `ulimit -f` a write past the limit then fails with EFBIG (named in one line, earlier
    checkpoints kept) instead of killing the process with SIGXFSZ. Only the main thread may set it."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def root_cause(e: BaseException) -> BaseException:
    """The first OSError inside DCP's CheckpointException (which collects every rank's failure)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for f in failures.values():
            inner = getattr(f, "exception", f)  # _WrappedException or the exception itself
            if isinstance(inner, BaseException):
                return root_cause(inner)
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e
