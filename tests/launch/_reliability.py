"""Helpers for the reliability battery (tests/launch/test_reliability*.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from launch.runtime.errors import run_cli


def cli_error(capsys, main, argv: list[str], *culprits: str) -> str:
    """Run an entry point's `main` in-process as `python -m` would; assert it fails in one line
    (exit 2, no traceback) naming every culprit; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    for culprit in culprits:
        assert str(culprit) in lines[0], (culprit, lines[0])
    return lines[0]


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (for 'nothing was touched' checks)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def checkpoint_digest(run_dir: Path) -> dict[str, str]:
    return digest(Path(run_dir) / "checkpoints")
