"""launch.checkpoint.tied_safetensors: a tied model written once per tie, read back with its ties and metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from launch.checkpoint.tied_safetensors import load_unique, save_unique


def tied_stack(seed: int) -> nn.Sequential:
    """Positions 0 and 2 share one Linear (as a grown stack reuses a block); position 1 is its own."""
    torch.manual_seed(seed)
    shared = nn.Linear(6, 6)
    return nn.Sequential(shared, nn.Linear(6, 6), shared)


def test_round_trip_keeps_ties_and_metadata(tmp_path):
    model = tied_stack(0)
    path = tmp_path / "tied.safetensors"
    save_unique(model, path, metadata={"scalenet_spec": json.dumps({"mapping": [0, 1, 0]})})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["0.bias", "0.weight", "1.bias", "1.weight"]  # the tie stored once

    fresh = tied_stack(1)
    meta = load_unique(fresh, path)
    assert json.loads(meta["scalenet_spec"]) == {"mapping": [0, 1, 0]}
    assert fresh[0].weight is fresh[2].weight
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_missing_tie_is_named(tmp_path):
    path = tmp_path / "part.safetensors"
    save_unique(nn.Sequential(nn.Linear(6, 6)), path)
    with pytest.raises(RuntimeError, match="missing"):
        load_unique(tied_stack(0), path)
