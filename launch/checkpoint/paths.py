"""Where a run's checkpoints are and which one to use: `run.dir/checkpoints/step_N/`, the newest
intact one (damaged newer ones skipped with a warning), and a path given on a command line (a
checkpoint directory, or a run directory meaning its newest intact checkpoint)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from launch.checkpoint.collectives import all_ranks, rank, world_size
from launch.checkpoint.read import TRAINER_STATE, checkpoint_problem, usability_problem
from launch.runtime.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every step_N directory (complete or not), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The step_N directories holding a trainer state (written last, so present once complete), oldest first."""
    return [(step, p) for step, p in step_dirs(run_dir) if (p / TRAINER_STATE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def latest_intact(
    run_dir: str | Path,
    warn: bool = True,
    expected: dict[str, tuple[int, ...]] | None = None,
    skipped: dict[Path, str] | None = None,
) -> Path | None:
    """The newest usable checkpoint: its files match its manifest and its content can be used
    (launch.checkpoint.read.usability_problem; with `expected`, the configured model's tensor shapes,
    its tensors fit too). Every newer one is skipped with one warning line naming what is wrong; if
    checkpoints exist but none is usable, a UserError naming the problems. `skipped` ({path: why})
    adds checkpoints a caller found unusable while loading them. Collective when a process group is
    up: the ranks split the checksum work."""
    skipped = dict(skipped or {})
    damaged: list[str] = []
    for _step, path in reversed(step_dirs(run_dir)):
        if path in skipped:
            damaged.append(skipped[path])
            continue
        problem = checkpoint_problem(path, (rank(), world_size()))
        if problem is None and (rank() == 0 or world_size() == 1):
            problem = usability_problem(path, expected)
        problems = [p for p in all_ranks(problem) if p]
        if not problems:
            if damaged and warn and rank() == 0:
                print(
                    f"warning: skipping damaged checkpoint(s): {'; '.join(damaged)}; resuming from {path}",
                    file=sys.stderr,
                    flush=True,
                )
            return path
        damaged.append(problems[0])
    if damaged:
        raise UserError(
            f"no intact checkpoint in {checkpoint_dir(run_dir)}: {'; '.join(damaged[:3])}. Delete the damaged checkpoint "
            "directories to start this run over, or restore them (or the run's model config)"
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest intact checkpoint)."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        return p
    latest = None
    if checkpoint_dir(p).is_dir():
        latest = latest_intact(p)
    if latest is not None:
        return latest
    raise UserError(
        f"no checkpoint at {p} (expected a checkpoints/step_N directory or a run directory holding one)"
    )
