"""launch.quickstart: both arms trained, evaluated and reported; the printed table is the runs' own
numbers; the dtype rule; the verdict says only what the seeds show."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launch.quickstart import ARMS, ROWS, TASK, choose_dtype, verdict
from launch.report.runs import read_records
from launch.runtime.hardware import BF16_MIN_DIM, auto_dtype
from tests.conftest import run_module


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    return out, run_quickstart(out).stdout


def run_quickstart(out: Path):
    """A 6-step quickstart into `out` (8 people; fp32, so the result does not depend on the CPU)."""
    args = ("steps=6", "n_entities=8", "sample_tokens=6", "dtype=fp32")
    return run_module("launch.quickstart", f"out={out}", *args, timeout=900)


def _table(text: str) -> dict[str, list[str]]:
    """{row name: [dense cell, Memory+ cell]} of the printed Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 1 + len(ARMS) and cells[0] and not set(cells[1]) <= {"-", ":"}:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.integration
def test_quickstart_trains_both_arms_and_prints_their_own_numbers(quickstart):
    out, stdout = quickstart
    runs = {arm: out / "runs" / f"{arm}_seed-0" for arm in ARMS}
    printed = (out / "table.md").read_text().strip()
    assert printed in stdout
    table = _table(printed)
    for i, run in enumerate(runs.values()):
        records = read_records(run)
        final = [r for r in records if "final_val_ppl" in r][-1]
        train = [r for r in records if "loss" in r and "tokens_per_s" in r]
        assert train[-1]["step"] == 6
        assert table["validation perplexity (plays)"][i] == f"{final['final_val_ppl']:.1f}"
        assert table["peak memory (MB)"][i] == f"{max(r['peak_mem_mb'] for r in train):,.0f}"
        results = json.loads((run / "eval" / "results.json").read_text())
        assert table["fact recall (exact match)"][i] == f"{results['tasks'][TASK]['exact_match']:.3f}"
        assert results["sample"]  # each model's sample, printed below the table
    params = [int(c.replace(",", "")) for c in table["parameters (total)"]]
    active = [int(c.replace(",", "")) for c in table["parameters active per token"]]
    assert params[1] > 10 * params[0]  # 65k memory values
    assert abs(active[1] - active[0]) / active[0] < 0.05  # equal active parameters per token
    assert len(table) == len(ROWS)
    # The report: loss curves and the rest, non-empty PNGs.
    report = out / "report"
    assert (report / "report.md").is_file()
    for png in ("loss_steps.png", "loss_tokens.png", "tokens_per_s.png"):
        assert (report / png).stat().st_size > 1000
    assert re.search(r"samples \(temperature=0\.8 top_k=50 top_p=0\.95 seed=0 tokens=6\)", stdout)
    assert "Memory+ is ahead on fact recall in" in stdout and "one seed" in stdout


@pytest.mark.integration
def test_quickstart_rerun_reuses_finished_runs(quickstart):
    out, first = quickstart
    before = {p: p.read_bytes() for p in (out / "runs").glob("*/metrics.jsonl")}
    proc = run_quickstart(out)
    assert "already finished at step 6" in proc.stdout
    assert {p: p.read_bytes() for p in before} == before  # no step trained or logged twice
    assert (out / "table.md").read_text().strip() in proc.stdout


def test_auto_dtype_needs_a_matrix_unit_and_width(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert auto_dtype(BF16_MIN_DIM, amx)[0] == "bf16"
    assert auto_dtype(64, amx) == (
        "fp32",
        f"CPU with AMX-BF16 matrix units, but at width 64 < {BF16_MIN_DIM} bf16 measured no faster",
    )
    assert auto_dtype(4096, plain) == ("fp32", "no bf16 matrix unit found")
    assert auto_dtype(4096, tmp_path / "missing")[0] == "fp32"


def _rows(dense: list[tuple[float, float]], memory: list[tuple[float, float]]) -> list[dict]:
    key = f"{TASK}/exact_match"
    return [{"arm": "dense", key: em, "final_val_ppl": ppl} for em, ppl in dense] + [
        {"arm": "memory", key: em, "final_val_ppl": ppl} for em, ppl in memory
    ]


def test_verdict_counts_seeds_and_never_claims_a_tie():
    text = verdict(_rows([(0.1, 100.0), (0.2, 90.0), (0.3, 80.0)], [(0.2, 90.0), (0.2, 95.0), (0.1, 70.0)]))
    assert text == (
        "Memory+ is ahead on fact recall in 1 of 3 seed(s); Memory+ is ahead on validation perplexity in 2 of 3 seed(s)"
    )
    one = verdict(_rows([(0.5, 50.0)], [(0.1, 60.0)]))
    assert one.startswith("Memory+ is ahead on fact recall in 0 of 1 seed(s)") and "one seed" in one


def test_choose_dtype_reads_the_quickstart_models_width():
    dtype, why = choose_dtype("auto")
    assert dtype == "fp32" and why.startswith("auto: ")  # width 64: fp32 with or without a matrix unit
    assert choose_dtype("bf16") == ("bf16", "dtype= given")
