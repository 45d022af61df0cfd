"""Smoke test: the lookup benchmark runs end to end in --quick mode and writes its report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_lookup.py"


def test_quick_benchmark_writes_expected_fields(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "memory_lookup.json").read_text())
    assert {"machine", "config", "native", "lookup", "value_step"} <= report.keys()
    assert report["machine"]["num_threads"] >= 1 and report["machine"]["cpu_model"]
    assert report["config"]["quick"] is True

    lookups = {r["method"]: r for r in report["lookup"]}
    for name in ("embedding_bag (sparse grad)", "embedding_bag (dense grad)", "naive gather (dense grad)"):
        assert lookups[name]["forward_backward"]["ms"] > 0
    ours = lookups["lookup_cpu C++ (sparse grad)"]
    assert "skipped" in ours or "speedup_vs_eb_sparse" in ours

    steps = {r["method"]: r for r in report["value_step"]}
    assert steps["embedding_bag sparse + SparseAdam"]["value_step"]["ms"] > 0
    assert "speedup_vs_best_stock_adam" in steps["lookup_cpu (sparse grad) + RowSparseAdam"]
    assert any(m.startswith("FBGEMM") for m in steps)  # measured, or recorded as not importable

    md = (tmp_path / "memory_lookup.md").read_text()
    assert "Load average at start" in md and "RowSparseAdam" in md
    floor = next(r for m, r in steps.items() if m.startswith("floor:"))
    assert floor["value_step"]["ms"] > 0 and floor["unique_rows_per_step"] > 0 and floor["copy_gbps"] > 0
    paired = report["lookup_paired"] + report["value_step_paired"]
    assert [r["what"] for r in paired] == ["forward", "forward + backward", "value step"]
    for rec in paired:
        assert rec["pairs"] == 12 and rec["stock_ms"] > 0 and rec["ours_ms"] > 0
        lo, hi = rec["speedup_range"]
        assert lo <= rec["speedup_median"] <= hi
    assert "## Paired" in md and "| forward + backward |" in md


def test_row_traffic_benchmark_runs_and_writes_its_table(tmp_path):
    from memlayers.lookup_cpu import native_available

    if not native_available():
        pytest.skip("C++ extension did not build")
    script = BENCH.parent / "row_traffic.py"
    args = ["--rows", "4096", "--dim", "40", "--bags", "64", "--slots", "16", "--reps", "2", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                          cwd=BENCH.parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "row_traffic.json").read_text())
    assert [r["method"].split(",")[0] for r in report["rows"]] == [
        "state read-modify-write", "state read-modify-write", "catch-up kernel", "fused backward + update kernel"
    ]  # fmt: skip
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in report["rows"])
    assert 0 < report["unique_rows"] <= 4096
    assert "GB/s of state traffic" in (tmp_path / "row_traffic.md").read_text()


def test_product_topk_benchmark_runs_and_writes_its_table(tmp_path):
    from memlayers.lookup_cpu import native_available

    if not native_available():
        pytest.skip("C++ extension did not build")
    script = BENCH.parent / "product_topk.py"
    args = ["--tokens", "8", "--heads", "2", "--n-keys", "64", "--knn", "8", "--half", "4", "--reps", "2", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                          cwd=BENCH.parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "product_topk.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert len(methods) == 3 and methods[1].startswith("ours") and all(r["ms"] > 0 for r in report["rows"])
    assert "top-8" in (tmp_path / "product_topk.md").read_text()
    routes = report["with_backward"]
    assert [r["method"].split(":")[0] for r in routes] == ["einsum + C++ top-k + gather, autograd (dense score gradient)", "ours"]
    assert all(r["ms"] > 0 and r["min_ms"] <= r["ms"] for r in routes)


def test_gpu_check_script_parses_and_names_files_that_exist():
    """benchmarks/gpu_check.sh runs only on a lent GPU machine; catch syntax errors and renamed
    scripts or test files here, where a broken script costs nothing."""
    script = BENCH.parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    repo = BENCH.parents[1]
    named = set(re.findall(r"(?:benchmarks|tests)/[\w/]+\.py", script.read_text()))
    assert {"benchmarks/memory_lookup.py", "benchmarks/memory_vs_dense.py", "tests/memlayers/test_triton_lookup.py"} <= named
    assert [p for p in sorted(named) if not (repo / p).is_file()] == []


def test_lookup_benchmark_runs_on_the_devices_asked(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--skip-value-step", "--devices", "cpu", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "memory_lookup.json").read_text())
    assert report["value_step"] == [] and report["lookup"]
    assert {r["device"] for r in report["lookup"]} == {"cpu"}
