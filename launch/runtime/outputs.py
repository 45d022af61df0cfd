"""Safe outputs for every command that writes (convert, grow, eval, facts, tokenizer, and train's run.dir).

The rules, one place for every command:
- an output that is, contains, or lies inside one of the command's sources is refused up front;
- an output never lands on or inside a run directory's own files (its checkpoints/, config.yaml,
  metrics.jsonl, ...) or inside any checkpoint, whichever command made them: they are recognised by
  their markers, walking up from the output (`protected_owner`), not only by the source named, so
  `to-hf ... out=RUN/checkpoints/step_99` cannot plant a directory the trainer later takes for a
  damaged checkpoint, and `eval out=RUN` cannot write into a run;
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
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from launch.checkpoint.storage import local_path
from launch.runtime.debris import remove_dead_temps
from launch.runtime.errors import UserError

MARKER = ".launch_output.json"  # {"command": ..., "time": ...}: written into every output directory

# What a trainer's run directory holds at its top level (launch.train writes these, and nothing else
# may): an output at or under one of them would be overwritten, pruned or taken for a checkpoint.
RUN_OWNED = (
    "checkpoints",
    "config.yaml",
    "metrics.jsonl",
    "tokenizer.model",
    "run.lock",
    "data_cache",
    "tensorboard",
    "wandb",
    "wandb_id",
)
# What a trainer rewrites in its run.dir whatever is there: a non-run directory holding one is refused.
_RUN_REWRITES = ("config.yaml", "metrics.jsonl", "tensorboard", "wandb_id")
_RUN_FILES = ("run.lock", "metrics.jsonl")  # a directory holding one of these is a run directory
_CHECKPOINT_FILES = ("manifest.json", "trainer_state.json")  # ... and one of these a checkpoint
_STEP_DIR = re.compile(r"^step_\d+$")


def is_run_dir(path: Path) -> bool:
    """A trainer's run directory: its lock or metrics file, or a checkpoints/ of step_N directories."""
    if any((path / f).is_file() for f in _RUN_FILES):
        return True
    ckpts = path / "checkpoints"
    try:
        return ckpts.is_dir() and any(
            _STEP_DIR.match(p.name) or p.name.startswith(".tmp_step_") for p in ckpts.iterdir()
        )
    except OSError:
        return False


def is_checkpoint(path: Path) -> bool:
    """A checkpoint directory (ours, grow's, from-hf's, or an older format's)."""
    return any((path / f).is_file() for f in _CHECKPOINT_FILES) or (path / "state" / ".metadata").is_file()


def protected_owner(path: Path, *, allow_run: bool = False) -> str | None:
    """Why writing at `path` would land in a run's or a checkpoint's files, or None.

    Walks up from `path` itself: `path` being a checkpoint, lying inside one, being a run directory
    (unless `allow_run`: train's own run.dir), being or lying under a run's own entries (RUN_OWNED),
    or being a step_N under a checkpoints/ directory (where a trainer would look for it)."""
    path = path.resolve()
    if path.parent.name == "checkpoints" and _STEP_DIR.match(path.name):
        return f"is a checkpoint slot of the run {path.parent.parent} (trainers resume from and prune checkpoints/step_N)"
    for p in (path, *path.parents):
        if p.is_dir() and is_checkpoint(p):
            return "is the checkpoint" if p == path else f"lies inside the checkpoint {p}"
        if p.is_dir() and is_run_dir(p):
            if p == path:
                return None if allow_run else "is the run directory"
            top = path.relative_to(p).parts[0]
            if top in RUN_OWNED:
                return f"lies in {p / top}, which the run {p} owns"
            return None  # a directory of its own next to the run's files (a sweep's eval/, grown/)
    return None


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
        local = local_path(src)
        if local is None:  # a checkpoint on a remote store: no local output can lie inside it
            continue
        s = local.resolve()
        if real == s or s in real.parents or real in s.parents:
            raise UserError(
                f"{key}={out} is, contains or lies inside the source {src}; choose a directory outside it"
            )
    _check_not_file(out, key)
    # An earlier output of this very command (grow and from-hf write checkpoints) may be replaced.
    own = overwrite and out.is_dir() and written_by(out) == command
    why = None if own else protected_owner(out)
    if why:
        raise UserError(
            f"{key}={out} {why}; {command} never writes into runs or checkpoints: choose another directory"
        )
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
        # A killed earlier run of any command writing `out` left its temporaries: gone now.
        remove_dead_temps(out.parent, re.compile(rf"\.(?:tmp|old)_{re.escape(out.name)}_(?P<pid>\d+)"))
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
    why = protected_owner(out.absolute())
    if why:
        raise UserError(f"{key}={out} {why}; choose a path outside runs and checkpoints")
    if out.exists() and not overwrite:
        raise UserError(f"{key}={out} exists; pass overwrite=true to replace it")
    return out


def check_run_dir(run_dir: str | Path, key: str = "run.dir") -> Path:
    """launch.train's run.dir: new, empty, a run directory, or a directory holding none of the names a
    run writes (a sweep's log next to it); never inside a checkpoint or another run's own files. Checked
    before the lock file is created, so a refused directory is left exactly as it was."""
    path = Path(run_dir).absolute()  # a file in the way is make_run_dir's one line
    why = protected_owner(path, allow_run=True)
    if why:
        raise UserError(f"{key}={run_dir} {why}: a run directory must be new, empty or an earlier run's")
    if path.is_dir() and not is_run_dir(path):
        # Inputs a run may be given in place (data_cache/, tokenizer.model) are not in the way.
        clash = sorted(n for n in _RUN_REWRITES if (path / n).exists())
        if clash:
            raise UserError(
                f"{key}={run_dir} is not a run directory but holds {', '.join(clash)}, which a run would "
                "overwrite: choose a new or empty directory"
            )
    return path
