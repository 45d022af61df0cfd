"""Safe outputs for the commands that write a directory or a file (convert, grow, facts, tokenizer).

The rules, one place for every command:
- an output that is, contains, or lies inside one of the command's sources is refused up front;
- an output path that is (or runs through) a regular file is refused;
- an existing non-empty output directory is refused unless `overwrite=true`, and even then it is
  replaced only if it carries the marker file this command wrote into it earlier: overwrite=true
  never deletes a run, a checkpoint or anything else the command did not make;
- the new output is written into a temporary sibling and renamed into place when complete, so a
  failure halfway leaves the previous output (or nothing) behind, never a half-written directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from launch.runtime.errors import UserError

MARKER = ".launch_output.json"  # {"command": ..., "time": ...}: written into every output directory


def written_by(path: Path) -> str | None:
    """The command recorded in `path`'s marker, or None if it has none (or an unreadable one)."""
    try:
        return json.loads((path / MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def _check_not_file(out: Path, key: str) -> None:
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == out else f"runs through the file {p}"
            raise UserError(f"{key}={out} {what}: expected a directory")


def check_output_dir(
    out: str | Path,
    *,
    command: str,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    key: str = "out",
) -> Path:
    """`out` as an absolute Path if `command` may write its output directory there; else UserError."""
    if not str(out):
        raise UserError(f"{key}= is required: the directory to write")
    out = Path(out).absolute()
    real = out.resolve()
    for src in sources:
        s = Path(src).resolve()
        if real == s or s in real.parents or real in s.parents:
            raise UserError(
                f"{key}={out} is, contains or lies inside the source {src}; choose a directory outside it"
            )
    _check_not_file(out, key)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{key}={out} exists and is not empty; pass overwrite=true to replace an earlier {command} output"
            )
        if written_by(out) != command:
            raise UserError(
                f"{key}={out} exists and was not written by {command} (no {MARKER} marker): overwrite=true replaces "
                "only an earlier output of the same command; remove it yourself or choose another directory"
            )
    return out


@contextmanager
def output_dir(
    out: str | Path,
    *,
    command: str,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
    key: str = "out",
) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `out` (checked as above)."""
    sources = list(sources)
    out = check_output_dir(out, command=command, overwrite=overwrite, sources=sources, key=key)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".tmp_{out.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"{key}={out}: cannot create a directory next to it ({e.strerror})") from None
    try:
        yield tmp
        (tmp / MARKER).write_text(
            json.dumps({"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
        )
        # Checked again: another process may have written `out` while this one worked.
        check_output_dir(out, command=command, overwrite=overwrite, sources=sources, key=key)
        if out.is_dir() and any(out.iterdir()):
            old = out.parent / f".old_{out.name}_{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.is_dir():
                out.rmdir()
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(out: str | Path, *, overwrite: bool = False, key: str = "out") -> Path:
    """`out` as a Path if a file may be written there: not a directory, not an existing file unless
    `overwrite`, no file on the way."""
    if not str(out):
        raise UserError(f"{key}= is required: the file to write")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{key}={out} is a directory: expected a file path")
    _check_not_file(out.parent, key)
    if out.exists() and not overwrite:
        raise UserError(f"{key}={out} exists; pass overwrite=true to replace it")
    return out


def check_output_path(out: str | Path | None, key: str = "out") -> None:
    """For commands that add files to a directory (launch.eval out=): only refuse a file in the way."""
    if out:
        _check_not_file(Path(out).absolute(), key)
