"""The benchmarks' --out is checked when arguments are parsed: a file path fails at once with a message
naming the expected folder, before any measuring (it used to surface as FileExistsError afterwards)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.harness import measure_training_paired, results_dir
from tests.benchmarks.checks import measured_at, median_in_range, ratio_of, result_record
from tests.conftest import REPO


@pytest.mark.parametrize(
    "name", ["memory_vs_dense", "product_topk", "train_throughput", "cross_entropy", "memory_lookup"]
)
def test_out_that_is_a_file_fails_before_measuring(name, tmp_path):
    existing = tmp_path / "results.md"
    existing.write_text("keep me\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", name, "--out", str(existing)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is a file; --out takes a folder" in proc.stderr
    assert existing.read_text() == "keep me\n"


def test_results_dir_accepts_new_and_existing_folders(tmp_path):
    assert results_dir(str(tmp_path)) == tmp_path
    assert results_dir(str(tmp_path / "new")) == tmp_path / "new"


def test_paired_measurement_alternates_two_models_in_one_process():
    """measure_training_paired (memory_vs_dense.py's ratio): both models step in one process, the ratio
    is a median over pairs inside the pairs' range, and the base model's speed is reported beside it."""
    mem = ["memory.layers=[1]", "memory.n_keys=16", "memory.heads=2", "memory.k_dim=16", "memory.knn=4"]
    r = measure_training_paired("configs/tiny.yaml", mem, [], steps=3, warmup=1)
    median_in_range(r["relative_paired"], *r["relative_paired_range"], what="relative_paired")
    for key in ("step_s", "tokens_per_s", "base_tokens_per_s_paired", "peak_mem_mb"):
        measured_at(r, key)
    assert r["params"] > r["active_params"]  # the memory model was measured, not the dense base


def test_cross_entropy_benchmark_writes_both_dtypes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "cross_entropy", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = result_record(json.loads((tmp_path / "cross_entropy.json").read_text()), "cross_entropy")["rows"]
    assert [(r["dtype"], r["method"]) for r in rows] == [
        ("float32", "F.cross_entropy(logits.float())"), ("float32", "cross_entropy_rows"),
        ("bfloat16", "F.cross_entropy(logits.float())"), ("bfloat16", "cross_entropy_rows"),
    ]  # fmt: skip
    for r in rows:  # the speed-up is over F.cross_entropy of the same dtype, the row before it
        base = next(b for b in rows if b["dtype"] == r["dtype"])
        ratio_of(r["speedup"], base["ms"], measured_at(r, "ms"), "speedup")
