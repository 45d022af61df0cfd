"""memlayers.shard_layout.MemoryShardLayout on one process (the multi-rank paths: tests/launch/test_memory_parallel.py)."""

from __future__ import annotations

import torch

from memlayers import MemoryPool, ProductKeyMemory
from memlayers.shard_layout import MemoryShardLayout


class Owner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        pool = MemoryPool(n_keys=8, v_dim=16, lookup_impl="torch")
        self.memory_pools = torch.nn.ModuleList([pool])
        self.mem = ProductKeyMemory(dim=12, pool=pool, heads=2, k_dim=8, knn=4)


def test_values_gradients_norm_and_usage_on_one_process():
    torch.manual_seed(0)
    model = Owner()
    layout = MemoryShardLayout(model)
    assert layout.parts == 1 and layout.regions() == {}
    assert list(layout.named_values()) == ["memory_pools.0.values"]
    assert layout.values()[0] is model.memory_pools[0].values
    layout.track_usage(True)
    x = torch.randn(5, 12)
    model.mem(x).pow(2).sum().backward()
    grad = model.memory_pools[0].values.grad.clone()
    layout.sync_grads()  # one process, data_parallel_size 1: unchanged
    torch.testing.assert_close(model.memory_pools[0].values.grad, grad)
    torch.testing.assert_close(layout.grad_sq_norm(), grad.double().pow(2).sum())
    layout.clip_(0.5)
    torch.testing.assert_close(model.memory_pools[0].values.grad, grad * 0.5)
    with layout.untracked():  # validation reads do not count
        model.mem(torch.randn(3, 12))
    stats = layout.usage_stats()
    assert stats["mem_reads"] == 5 * 2 * 4  # tokens × heads × knn of the training read only
    assert layout.usage_stats()["mem_reads"] == 0  # reset


def test_init_spec_declares_every_parameter():
    model = Owner()
    spec = model.mem.init_spec()
    assert set(spec) == {n for n, _ in model.mem.named_parameters()}
    assert model.memory_pools[0].init_spec() == {"values": ("normal", 0.0, 16**-0.5)}
