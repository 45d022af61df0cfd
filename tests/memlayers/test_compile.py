"""torch.compile(fullgraph=True) of a memory layer keeps the CPU lookup kernels as custom ops."""

from __future__ import annotations

import gc

import pytest
import torch

from memlayers import MemoryPool, ProductKeyMemory
from memlayers.lookup_cpu import bag_sum_op
from memlayers.optim.lazy_tables import has_lazy_tables

from ._compile_checks import assert_compiles_like_eager


def make_layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    pool = MemoryPool(n_keys=8, v_dim=24, lookup_impl="cpu", dtype=dtype)
    return ProductKeyMemory(dim=16, pool=pool, heads=2, k_dim=8, knn=4)


def test_custom_op_passes_opcheck():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(30, 9, generator=gen, requires_grad=True)
    indices = torch.randint(0, 30, (5, 4), generator=gen)
    weights = torch.rand(5, 4, generator=gen, requires_grad=True)
    torch.library.opcheck(bag_sum_op, (values, indices, weights))


@pytest.mark.requires_native
def test_compiled_memory_layer_has_no_graph_break_and_matches_eager():
    gc.collect()  # dead optimizers from other tests must not count as lazy tables
    assert not has_lazy_tables()
    eager, compiled_layer = make_layer(), make_layer()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    assert_compiles_like_eager(eager, compiled_layer, x, "bag_sum_cpu")
