"""MemoryPool: the read seam and usage statistics."""

from __future__ import annotations

import math

import pytest
import torch

from memlayers import MemoryPool, ProductKeyMemory
from memlayers.reference import reference_lookup


def test_read_is_weighted_bag_sum():
    pool = MemoryPool(4, 6, dtype=torch.float64)
    idx = torch.tensor([[0, 15, 15], [3, 2, 1]])
    w = torch.rand(2, 3, dtype=torch.float64)
    torch.testing.assert_close(pool.read(idx, w), reference_lookup(pool.values, idx, w))


def test_usage_off_by_default_allocates_nothing():
    pool = MemoryPool(4, 6)
    pool.read(torch.tensor([[1, 2]]), torch.ones(1, 2))
    assert pool.usage_counts is None
    assert pool.usage_stats() == {"mem_slots_read_frac": 0.0, "mem_usage_entropy": 0.0, "mem_reads": 0.0}


def test_usage_counts_and_stats():
    pool = MemoryPool(2, 3)  # 4 slots
    pool.track_usage = True
    pool.read(torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))
    assert pool.usage_counts.tolist() == [1, 1, 1, 1]
    stats = pool.usage_stats(reset=False)
    assert stats["mem_slots_read_frac"] == 1.0
    assert stats["mem_usage_entropy"] == pytest.approx(1.0)  # uniform over all slots
    assert stats["mem_reads"] == 4
    pool.read(torch.tensor([[0, 0, 0, 0]]), torch.ones(1, 4))  # counts now [5, 1, 1, 1]
    stats = pool.usage_stats()  # resets
    p = torch.tensor([5, 1, 1, 1], dtype=torch.float64) / 8
    assert stats["mem_usage_entropy"] == pytest.approx(float(-(p * p.log()).sum()) / math.log(4))
    assert stats["mem_reads"] == 8
    assert pool.usage_counts.sum() == 0
    pool.read(torch.tensor([[2, 2]]), torch.ones(1, 2))
    stats = pool.usage_stats()
    assert stats["mem_slots_read_frac"] == 0.25 and stats["mem_usage_entropy"] == 0.0


def test_usage_counts_not_in_state_dict_and_no_grad():
    pool = MemoryPool(3, 2)
    pool.track_usage = True
    pool.read(torch.tensor([[1, 4]]), torch.ones(1, 2, requires_grad=True))
    assert list(pool.state_dict()) == ["values"]
    assert pool.usage_counts.dtype == torch.int64 and not pool.usage_counts.requires_grad


def test_usage_through_layers_counts_every_read():
    torch.manual_seed(0)
    pool = MemoryPool(8, 4)
    layers = [ProductKeyMemory(16, pool, heads=2, k_dim=8, knn=3) for _ in range(2)]
    pool.track_usage = True
    x = torch.randn(5, 16)
    for layer in layers:
        layer(x)
    stats = pool.usage_stats()
    assert stats["mem_reads"] == 2 * 5 * 2 * 3  # layers * tokens * heads * knn
    read = torch.cat([layer.select(x)[0].flatten() for layer in layers]).unique()
    assert stats["mem_slots_read_frac"] == read.numel() / 64
    assert 0 < stats["mem_usage_entropy"] < 1


def test_reset_parameters_std_and_meta():
    with torch.device("meta"):
        pool = MemoryPool(16, 32)
    pool.to_empty(device="cpu")
    pool.init_weights(std=0.5)
    assert abs(pool.values.std().item() - 0.5) < 0.05
