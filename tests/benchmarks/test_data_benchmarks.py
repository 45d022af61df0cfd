"""Smoke tests of the data-pipeline benchmark's source and one-file modes (`--quick`: one copy of the plays).
Structure and sanity only: every measured time and memory is positive and finite, and tokens/s is the
stored tokens over the stored seconds, on any machine."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.checks import measured, ratio_of, result_record
from tests.benchmarks.test_kernel_benchmarks import bench


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "name", "kinds"),
    [
        (["--one-file", "1"], "data_pipeline_one_file", 1),
        (["--sources", "1"], "data_pipeline_sources", 4),
    ],
)
def test_data_pipeline_modes_write_their_records(tmp_path, mode, name, kinds):
    bench("data_pipeline", *mode, "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    rec = result_record(json.loads((tmp_path / "out" / f"{name}.json").read_text()), name)
    assert len(rec["rows"]) == kinds
    for row in rec["rows"]:
        assert row["tokens"] > 0
        for key in ("seconds", "max_process_rss_mb", "tree_rss_mb"):
            measured(row[key], key)
        ratio_of(row["tokens_per_s"], row["tokens"], row["seconds"], "tokens_per_s")
    assert (tmp_path / "out" / f"{name}.md").read_text().startswith("# Data pipeline")
