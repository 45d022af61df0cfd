"""Smoke tests of the kernel benchmarks (memory_lookup, row_traffic, product_topk) through
`python -m benchmarks NAME`: each runs end to end at tiny sizes and writes its record."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.benchmarks.checks import measured, measured_at, median_in_range, ratio_of, result_record
from tests.conftest import REPO


def bench(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m benchmarks NAME ARGS` from the repo root; fails the test with its stderr on error."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", name, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.requires_native
def test_quick_benchmark_writes_expected_fields(tmp_path):
    bench("memory_lookup", "--quick", "--out", str(tmp_path))
    report = result_record(json.loads((tmp_path / "memory_lookup.json").read_text()), "memory_lookup")
    assert {"machine", "config", "native", "lookup", "value_step"} <= report.keys()
    assert report["machine"]["num_threads"] >= 1 and report["machine"]["cpu_model"]
    assert report["config"]["quick"] is True

    lookups = {r["method"]: r for r in report["lookup"]}
    for name in ("embedding_bag (sparse grad)", "embedding_bag (dense grad)", "naive gather (dense grad)"):
        measured_at(lookups[name], "forward", "ms")
        measured_at(lookups[name], "forward_backward", "ms")
        assert all(measured(t) for t in lookups[name]["forward"]["ms_all"])
    ours = lookups["lookup_cpu C++ (sparse grad)"]
    ratio_of(ours["speedup_vs_eb_sparse"], lookups["embedding_bag (sparse grad)"]["forward_backward"]["ms"],
                 ours["forward_backward"]["ms"], "speedup_vs_eb_sparse")  # fmt: skip

    steps = {r["method"]: r for r in report["value_step"]}
    measured_at(steps["embedding_bag sparse + SparseAdam"], "value_step", "ms")
    assert "speedup_vs_best_stock_adam" in steps["lookup_cpu (sparse grad) + RowSparseAdam"]
    assert any(m.startswith("FBGEMM") for m in steps)  # measured, or recorded as not importable

    md = (tmp_path / "memory_lookup.md").read_text()
    assert "Load average at start" in md and "RowSparseAdam" in md
    floor = next(r for m, r in steps.items() if m.startswith("floor:"))
    measured_at(floor, "value_step", "ms"), measured_at(floor, "copy_gbps")
    assert floor["unique_rows_per_step"] > 0
    paired = report["lookup_paired"] + report["value_step_paired"]
    assert [r["what"] for r in paired] == ["forward", "forward + backward", "value step"]
    for rec in paired:
        assert rec["pairs"] == 12
        measured_at(rec, "stock_ms"), measured_at(rec, "ours_ms")
        median_in_range(rec["speedup_median"], *rec["speedup_range"], what="speedup_median")
    assert "## Paired" in md and "| forward + backward |" in md


@pytest.mark.requires_native
def test_row_traffic_benchmark_runs_and_writes_its_table(tmp_path):
    bench("row_traffic", "--quick", "--out", str(tmp_path), timeout=600)
    report = result_record(json.loads((tmp_path / "row_traffic.json").read_text()), "row_traffic")
    assert [r["method"].split(",")[0] for r in report["rows"]] == [
        "state read-modify-write", "state read-modify-write", "catch-up kernel", "fused backward + update kernel"
    ]  # fmt: skip
    for r in report["rows"]:
        measured_at(r, "ms"), measured_at(r, "gbps")
    assert 0 < report["unique_rows"] <= 4096
    assert "GB/s of state traffic" in (tmp_path / "row_traffic.md").read_text()


@pytest.mark.requires_native
def test_product_topk_benchmark_runs_and_writes_its_table(tmp_path):
    bench("product_topk", "--quick", "--out", str(tmp_path))
    report = result_record(json.loads((tmp_path / "product_topk.json").read_text()), "product_topk")
    methods = [r["method"] for r in report["rows"]]
    assert len(methods) == 3 and methods[1].startswith("ours")
    for r in report["rows"]:
        ratio_of(r["speedup"], report["rows"][0]["ms"], measured_at(r, "ms"), "speedup")
    assert "top-8" in (tmp_path / "product_topk.md").read_text()
    routes = report["with_backward"]
    assert [r["method"].split(":")[0] for r in routes] == [
        "einsum + C++ top-k + gather, autograd (dense score gradient)",
        "ours",
    ]
    for r in routes:
        assert measured_at(r, "min_ms") <= measured_at(r, "ms")


def test_gpu_check_script_parses_and_names_files_that_exist():
    """benchmarks/gpu_check.sh runs only on a lent GPU machine; catch syntax errors and renamed
    scripts or test files here, where a broken script costs nothing."""
    from benchmarks import names

    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    run = set(re.findall(r"-m benchmarks (\w+)", text))
    assert {"memory_lookup", "memory_vs_dense"} <= run and run <= set(names())
    files = set(re.findall(r"tests/[\w/]+\.py", text))
    assert "tests/memlayers/test_triton_lookup.py" in files
    assert [p for p in sorted(files) if not (REPO / p).is_file()] == []


def test_lookup_benchmark_runs_on_the_devices_asked(tmp_path):
    # --out-dir: the older spelling of --out, still used by benchmarks/gpu_check.sh
    bench("memory_lookup", "--quick", "--skip-value-step", "--devices", "cpu", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "memory_lookup.json").read_text())
    assert report["value_step"] == [] and report["lookup"]
    assert {r["device"] for r in report["lookup"]} == {"cpu"}
