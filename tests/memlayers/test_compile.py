"""torch.compile(fullgraph=True) of a memory layer keeps the CPU lookup kernels as custom ops."""

from __future__ import annotations

import gc

import pytest
import torch

from memlayers import MemoryPool, ProductKeyMemory, row_sparse_adam
from memlayers.lookup_cpu import bag_sum_op, native_available


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


@pytest.mark.skipif(not native_available(), reason="C++ extension did not build")
def test_compiled_memory_layer_has_no_graph_break_and_matches_eager():
    gc.collect()  # dead optimizers from other tests must not count as lazy tables
    assert not row_sparse_adam.has_lazy_tables()
    torch._dynamo.reset()
    eager, compiled_layer = make_layer(), make_layer()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    explanation = torch._dynamo.explain(compiled_layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("bag_sum_cpu" in o for o in ops), ops  # our kernel, not embedding_bag
    assert not any("embedding_bag" in o for o in ops)

    torch._dynamo.reset()
    # aot_eager: the same graph and custom ops as inductor (checked once by hand; inductor compiles for
    # minutes on a loaded 2-core machine).
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    y_eager, y_comp = eager(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_layer.parameters()):
        g_c = p_c.grad.to_dense() if p_c.grad.is_sparse else p_c.grad
        g_e = p_e.grad.to_dense() if p_e.grad.is_sparse else p_e.grad
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6, msg=name)
