"""The benchmarks' --out is checked when arguments are parsed: a file path fails at once with a message
naming the expected folder, before any measuring (it used to surface as FileExistsError afterwards)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", ["memory_vs_dense.py", "product_topk.py", "train_throughput.py"])
def test_out_that_is_a_file_fails_before_measuring(script, tmp_path):
    existing = tmp_path / "results.md"
    existing.write_text("keep me\n")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--out", str(existing)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is a file; --out takes a folder" in proc.stderr
    assert existing.read_text() == "keep me\n"


def test_results_dir_accepts_new_and_existing_folders(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import results_dir
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert results_dir(str(tmp_path)) == tmp_path
    assert results_dir(str(tmp_path / "new")) == tmp_path / "new"
