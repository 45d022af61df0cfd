"""Triton lookup kernels vs the torch path and a naive loop-gather.

Runs directly on CUDA. On CPU these tests only run under the Triton interpreter, which must be switched
on before triton decorates the kernels: ``test_triton_interpreter.py`` runs this module in a subprocess
with ``TRITON_INTERPRET=1``; collected in the main (CPU) test process, the module skips itself.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", exc_type=ImportError)

if torch.cuda.is_available():
    DEVICE = "cuda"
    pytestmark = pytest.mark.gpu
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (see test_triton_interpreter.py)", allow_module_level=True)

from memlayers import lookup  # noqa: E402
from memlayers.reference import reference_lookup  # noqa: E402


def _case(n, d, b, k, dtype, seed=0, repeat=True):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d, generator=g, dtype=dtype)
    indices = torch.randint(0, n, (b, k), generator=g)
    if repeat and k > 1:
        indices[0, 1] = indices[0, 0]  # repeated within a bag
    if repeat and b > 1:
        indices[b - 1, 0] = indices[0, 0]  # and across bags
    weights = torch.rand(b, k, generator=g, dtype=dtype)
    grad_out = torch.randn(b, d, generator=g, dtype=dtype)
    return [t.to(DEVICE) for t in (values, indices, weights, grad_out)]


def _run(fn, values, indices, weights, grad_out, **kw):
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = fn(v, indices, w, **kw)
    out.backward(grad_out)
    gv = v.grad.to_dense() if v.grad.is_sparse else v.grad
    return out.detach(), gv, w.grad


SHAPES = [
    (16, 37, 5, 4),  # Dv not a power of two
    (8, 3, 6, 1),  # K = 1
    (4, 300, 3, 6),  # Dv > one column block (masked tail on the last block); K > N forces repeats
    (64, 32, 7, 16),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_matches_torch_and_reference(shape, dtype):
    values, indices, weights, grad_out = _case(*shape, dtype)
    got = _run(lookup, values, indices, weights, grad_out, impl="triton")
    ref_torch = _run(lookup, values, indices, weights, grad_out, impl="torch")
    ref_loop = _run(reference_lookup, values, indices, weights, grad_out)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    for a, t, r in zip(got, ref_torch, ref_loop):
        torch.testing.assert_close(a, t, **tol)
        torch.testing.assert_close(a, r, **tol)


def test_triton_sparse_grad_is_coalesced_and_exact():
    values, indices, weights, grad_out = _case(20, 11, 6, 5, torch.float64)
    v = values.clone().requires_grad_()
    # autograd.grad hands back the Function's own tensor (AccumulateGrad into .grad may drop the flag).
    (grad,) = torch.autograd.grad(lookup(v, indices, weights, impl="triton", sparse=True), v, grad_out)
    assert grad.is_sparse and grad.is_coalesced()
    assert grad._nnz() == torch.unique(indices).numel()
    dense = _run(lookup, values, indices, weights, grad_out, impl="torch")[1]
    torch.testing.assert_close(grad.to_dense(), dense)


def test_triton_bf16_accumulates_in_fp32():
    values, indices, weights, grad_out = _case(32, 40, 4, 8, torch.float32)
    got = _run(lookup, values.bfloat16(), indices, weights.bfloat16(), grad_out.bfloat16(), impl="triton")
    ref = _run(lookup, values, indices, weights, grad_out, impl="torch")
    assert got[0].dtype == torch.bfloat16
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.float(), r, atol=6e-2, rtol=2e-2)


def test_triton_all_bags_same_slot():
    # One unique slot read by every entry: a single CSR segment holding all B*K occurrences.
    values, _, weights, grad_out = _case(5, 9, 4, 3, torch.float64, repeat=False)
    indices = torch.full((4, 3), 2, dtype=torch.long, device=DEVICE)
    got = _run(lookup, values, indices, weights, grad_out, impl="triton")
    ref = _run(reference_lookup, values, indices, weights, grad_out)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


def test_triton_degenerate_shapes():
    values = torch.randn(6, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    out = lookup(values, torch.zeros(0, 3, dtype=torch.long, device=DEVICE),
                 torch.zeros(0, 3, dtype=torch.float64, device=DEVICE), impl="triton")  # fmt: skip
    assert out.shape == (0, 5)
    out.sum().backward()
    assert torch.count_nonzero(values.grad) == 0


def test_triton_weights_only_and_values_only_grads():
    values, indices, weights, grad_out = _case(10, 7, 3, 4, torch.float64)
    w = weights.clone().requires_grad_()
    lookup(values, indices, w, impl="triton").backward(grad_out)  # values frozen
    ref_w = _run(reference_lookup, values, indices, weights, grad_out)[2]
    torch.testing.assert_close(w.grad, ref_w)
    v = values.clone().requires_grad_()
    lookup(v, indices, weights, impl="triton").backward(grad_out)  # weights constant
    torch.testing.assert_close(v.grad, _run(reference_lookup, values, indices, weights, grad_out)[1])


def test_triton_custom_op_passes_opcheck():
    from memlayers.lookup_triton import bag_sum_triton_op

    values, indices, weights, _ = _case(30, 9, 5, 4, torch.float32)
    torch.library.opcheck(bag_sum_triton_op, (values.requires_grad_(), indices, weights.requires_grad_()))


def test_compiled_triton_memory_layer_has_no_graph_break_and_matches_eager():
    """torch.compile(fullgraph=True) keeps the Triton kernels (custom ops), and compiled outputs and
    gradients equal eager ones."""
    from memlayers import MemoryPool, ProductKeyMemory

    def make_layer():
        torch.manual_seed(0)
        pool = MemoryPool(n_keys=8, v_dim=24, lookup_impl="triton")
        return ProductKeyMemory(dim=16, pool=pool, heads=2, k_dim=8, knn=4).to(DEVICE)

    from ._compile_checks import assert_compiles_like_eager

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_compiles_like_eager(make_layer(), make_layer(), x, "bag_sum_triton")
