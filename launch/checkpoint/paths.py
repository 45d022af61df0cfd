"""Where a run's checkpoints are and which one to use: `run.dir/checkpoints/step_N/`, or
`train.checkpoint_dir/step_N/` (a local path or an fsspec URL, launch.checkpoint.storage); the newest
intact one (damaged newer ones skipped with a warning); and a path given on a command line (a
checkpoint directory, a run directory or a checkpoint root, each meaning its newest intact checkpoint).
Only committed step directories count (launch.checkpoint.atomic); uncommitted ones are debris."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from launch.checkpoint.atomic import committed
from launch.checkpoint.collectives import all_ranks, rank, world_size
from launch.checkpoint.read import TRAINER_STATE, checkpoint_problem, usability_problem
from launch.checkpoint.storage import CheckpointPath, as_path, is_url, renames
from launch.runtime.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING = re.compile(r"^\.(tmp|old)_step_\d+_\d+$")  # launch.checkpoint.atomic's temporaries


def configured_dir(run_dir: str | Path | CheckpointPath, checkpoint_dir: str | None) -> CheckpointPath:
    """The checkpoint root a run with `train.checkpoint_dir=checkpoint_dir` uses (empty: RUN/checkpoints)."""
    return as_path(checkpoint_dir) if checkpoint_dir else as_path(run_dir) / "checkpoints"


def recorded_dir(run_dir: str | Path | CheckpointPath) -> str | None:
    """`train.checkpoint_dir` in the run's config.yaml (read as plain YAML), None when unset or unknown."""
    import yaml

    if is_url(run_dir):
        return None
    try:
        value = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("train", {})
        value = value.get("checkpoint_dir")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def checkpoint_dir(run_dir: str | Path | CheckpointPath) -> CheckpointPath:
    """Where the run in `run_dir` keeps its checkpoints: its recorded `train.checkpoint_dir`, else RUN/checkpoints."""
    return configured_dir(run_dir, recorded_dir(run_dir))


def check_not_moved(run_dir: str | Path, root: CheckpointPath) -> None:
    """For a run about to start from step 0: refuse, in one line, when its config.yaml records another
    checkpoint root that holds checkpoints (train.checkpoint_dir changed or dropped on a re-run), instead
    of starting it over."""
    recorded = checkpoint_dir(run_dir)
    if str(recorded) != str(root) and step_dirs(None, root=recorded):
        raise UserError(
            f"{root} holds no checkpoint, but {Path(run_dir) / 'config.yaml'} keeps this run's checkpoints in "
            f"{recorded}: pass train.checkpoint_dir={recorded} to resume from them (or move them to {root}); "
            "the run is not started over from step 0"
        )


def step_dirs(
    run_dir: str | Path | None, *, root: CheckpointPath | None = None
) -> list[tuple[int, CheckpointPath]]:
    """Every committed step_N directory (intact or not), oldest first, in `root` (default: the run's)."""
    root = checkpoint_dir(run_dir) if root is None else root
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and committed(p):
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda x: x[0])


def debris(root: CheckpointPath) -> list[CheckpointPath]:
    """What killed writers left in a checkpoint root: local temporaries (`.tmp_step_*`, `.old_step_*`)
    and, on a store that cannot rename, step_N directories without their commit marker."""
    if not root.is_dir():
        return []
    return [
        p
        for p in root.iterdir()
        if _STAGING.match(p.name) or (not renames(p) and STEP_DIR.match(p.name) and not committed(p))
    ]


def list_checkpoints(
    run_dir: str | Path | None, *, root: CheckpointPath | None = None
) -> list[tuple[int, CheckpointPath]]:
    """The committed step_N directories holding a trainer state, oldest first."""
    return [(step, p) for step, p in step_dirs(run_dir, root=root) if (p / TRAINER_STATE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> CheckpointPath | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def latest_intact(
    run_dir: str | Path | None,
    warn: bool = True,
    expected: dict[str, tuple[int, ...]] | None = None,
    skipped: dict[CheckpointPath, str] | None = None,
    *,
    root: CheckpointPath | None = None,
) -> CheckpointPath | None:
    """The newest usable checkpoint (in `root`, default the run's): its files match its manifest and its
    content can be used (launch.checkpoint.read.usability_problem; with `expected`, the configured model's
    tensor shapes, its tensors fit too). Every newer one is skipped with one warning line naming what is
    wrong; if checkpoints exist but none is usable, a UserError naming the problems. `skipped` ({path: why})
    adds checkpoints a caller found unusable while loading them. Collective when a process group is
    up: the ranks split the checksum work."""
    root = checkpoint_dir(run_dir) if root is None else root
    skipped = dict(skipped or {})
    damaged: list[str] = []
    for _step, path in reversed(step_dirs(None, root=root)):
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
            f"no intact checkpoint in {root}: {'; '.join(damaged[:3])}. Delete the damaged checkpoint "
            "directories to start this run over, or restore them (or the run's model config)"
        )
    return None


def resolve_checkpoint(path: str | Path) -> CheckpointPath:
    """A checkpoint directory; or a run directory, or a checkpoint root (`train.checkpoint_dir`, local or
    a URL): its newest intact checkpoint."""
    p = as_path(path)
    if (p / TRAINER_STATE).is_file():
        return p
    for root in (p, checkpoint_dir(p)):
        if step_dirs(None, root=root):
            latest = latest_intact(None, root=root)
            if latest is not None:
                return latest
    raise UserError(
        f"no checkpoint at {p} (expected a checkpoint directory, a run directory holding checkpoints/step_N, "
        "or a train.checkpoint_dir holding step_N)"
    )
