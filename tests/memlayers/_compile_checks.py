"""One check shared by the CPU and Triton compile tests: a memory layer under torch.compile."""

from __future__ import annotations

import torch


def assert_compiles_like_eager(
    eager: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, op: str
) -> None:
    """`layer` (a fresh copy of `eager`) compiles with fullgraph and no graph break, its graph calls the
    custom op `op` (not embedding_bag), and its outputs and every gradient equal `eager`'s."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(op in o for o in ops), ops
    assert not any("embedding_bag" in o for o in ops)
    torch._dynamo.reset()
    # aot_eager: the same graph and custom ops as inductor (checked once by hand; inductor compiles for
    # minutes on a loaded 2-core machine).
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_eager, y_comp = eager(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), layer.parameters()):
        g_c = p_c.grad.to_dense() if p_c.grad.is_sparse else p_c.grad
        g_e = p_e.grad.to_dense() if p_e.grad.is_sparse else p_e.grad
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6, msg=name)
