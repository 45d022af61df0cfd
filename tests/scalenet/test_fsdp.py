"""FSDP2 on 2 gloo ranks: a grown model's loss, shared-weight grads and post-step weights equal the
single-process run, and ties hold (worker: fsdp_worker.py, run as a script for multiprocessing spawn)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import scalenet_test_toys as toys
import torch
import torch.distributed as dist

import scalenet

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_fsdp_units_group_positions_sharing_a_block():
    layers, _ = toys.make_layers(3)
    new = scalenet.grow(layers, mapping=[0, 1, 0, 2, 1])
    units = scalenet.fsdp_units(new)
    assert [[list(new).index(m) for m in u] for u in units] == [[0, 2], [1, 4], [3]]
    copies, _ = scalenet.grow_by_strategy(layers, "stack_copy")
    assert [len(u) for u in scalenet.fsdp_units(copies)] == [1] * 6


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_fsdp2_two_ranks_match_single_process(tmp_path):
    out = tmp_path / "fsdp.json"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report) == {"root", "units"}
    for layout, res in report.items():
        assert res["tied"], layout
        assert res["loss_err"] < 1e-12, (layout, res)
        assert res["grad_err"] < 1e-12, (layout, res)
        assert res["step_err"] < 1e-12, (layout, res)
    assert torch.distributed.is_available()
