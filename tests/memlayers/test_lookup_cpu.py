"""lookup_cpu against a naive gather loop (fp64) and F.embedding_bag, forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from memlayers import native
from memlayers.lookup_cpu import lookup_cpu
from memlayers.native import native_available

IMPLS = [
    pytest.param("cpp", marks=pytest.mark.requires_native),
    "torch",
]


def naive_lookup(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(indices.shape[0], values.shape[1], dtype=torch.float64)
    for b in range(indices.shape[0]):
        for k in range(indices.shape[1]):
            out[b] += weights[b, k].double() * values[indices[b, k]].double()
    return out


def naive_grads(values, indices, weights, grad_out):
    """Loop-level gradients: d/dV[r] = sum over reads of r of w * g[b]; d/dw[b,k] = <g[b], V[idx]>."""
    g_values = torch.zeros(values.shape, dtype=torch.float64)
    g_weights = torch.zeros(indices.shape, dtype=torch.float64)
    for b in range(indices.shape[0]):
        for k in range(indices.shape[1]):
            r = indices[b, k]
            g_values[r] += weights[b, k].double() * grad_out[b].double()
            g_weights[b, k] = (grad_out[b].double() * values[r].double()).sum()
    return g_values, g_weights


def make_inputs(n_slots, dim, bags, k, seed=0, repeat=True):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_slots, dim, generator=gen)
    indices = torch.randint(0, n_slots, (bags, k), generator=gen)
    if repeat and k >= 2:
        indices[0, 1] = indices[0, 0]  # repeated slot within a bag
        indices[-1, 0] = indices[0, 0]  # ... and across bags
    weights = torch.randn(bags, k, generator=gen)
    grad_out = torch.randn(bags, dim, generator=gen)
    return values, indices, weights, grad_out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparse_grad", [True, False])
@pytest.mark.parametrize(
    "shape",
    [
        (40, 37, 7, 5),
        (16, 8, 5, 1),
        (300, 64, 9, 12),
        (3, 1, 4, 6),
        (200, 130, 150, 9),
    ],  # 130: 2 column blocks + tail
)
def test_matches_naive_forward_backward(impl, sparse_grad, shape):
    values, indices, weights, grad_out = make_inputs(*shape)
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = lookup_cpu(v, indices, w, sparse_grad=sparse_grad, impl=impl)
    out.backward(grad_out)

    ref_out = naive_lookup(values, indices, weights)
    ref_gv, ref_gw = naive_grads(values, indices, weights, grad_out)
    assert out.dtype == torch.float32 and out.shape == (shape[2], shape[1])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert v.grad.is_sparse == sparse_grad
    torch.testing.assert_close(v.grad.to_dense().double(), ref_gv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_embedding_bag_dense(impl):
    values, indices, weights, grad_out = make_inputs(500, 48, 32, 16, seed=1)
    v1, w1 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    v2, w2 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    F.embedding_bag(indices, v1, mode="sum", per_sample_weights=w1).backward(grad_out)
    lookup_cpu(v2, indices, w2, impl=impl).backward(grad_out)
    torch.testing.assert_close(v2.grad, v1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_grad_is_coalesced_rows(impl):
    values, indices, weights, grad_out = make_inputs(60, 10, 8, 6, seed=2)
    v = values.clone().requires_grad_()
    (g,) = torch.autograd.grad(lookup_cpu(v, indices, weights, sparse_grad=True, impl=impl), v, grad_out)
    rows = g._indices()[0]
    assert g.is_coalesced()
    assert torch.equal(rows, indices.unique())  # unique and sorted: one row per touched slot
    assert g._values().shape == (rows.numel(), 10)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_grads_accumulate_across_backward_calls(impl):
    values, idx1, w1, g1 = make_inputs(30, 6, 5, 4, seed=3)
    _, idx2, w2, g2 = make_inputs(30, 6, 5, 4, seed=4)
    v = values.clone().requires_grad_()
    lookup_cpu(v, idx1, w1, sparse_grad=True, impl=impl).backward(g1)
    lookup_cpu(v, idx2, w2, sparse_grad=True, impl=impl).backward(g2)
    ref = naive_grads(values, idx1, w1, g1)[0] + naive_grads(values, idx2, w2, g2)[0]
    assert v.grad.is_sparse
    # Autograd sums the two into an uncoalesced tensor; the dense view must still be exact.
    torch.testing.assert_close(v.grad.to_dense().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_bf16_values_accumulate_in_fp32(impl, weights_dtype):
    values, indices, weights, grad_out = make_inputs(200, 37, 6, 64, seed=5)
    values_bf = values.bfloat16()
    weights_in = weights.to(weights_dtype)
    v = values_bf.clone().requires_grad_()
    w = weights_in.clone().requires_grad_()
    out = lookup_cpu(v, indices, w, sparse_grad=True, impl=impl)
    assert out.dtype == torch.promote_types(torch.bfloat16, weights_dtype)
    out.backward(grad_out.to(out.dtype))

    # Reference on exactly the rounded inputs, in fp64: only the output/grad rounding remains.
    ref_out = naive_lookup(values_bf, indices, weights_in)
    ref_gv, ref_gw = naive_grads(values_bf, indices, weights_in, grad_out.to(out.dtype))
    out_tol = 1e-5 if out.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=out_tol, atol=out_tol * ref_out.abs().max().item())
    assert v.grad.dtype == torch.bfloat16 and w.grad.dtype == weights_dtype
    torch.testing.assert_close(v.grad.to_dense().double(), ref_gv, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-2, atol=1e-2 * ref_gw.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_only_one_input_needs_grad(impl):
    values, indices, weights, grad_out = make_inputs(50, 12, 6, 7, seed=6)
    ref_gv, ref_gw = naive_grads(values, indices, weights, grad_out)
    w = weights.clone().requires_grad_()
    lookup_cpu(values, indices, w, impl=impl).backward(grad_out)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)
    v = values.clone().requires_grad_()
    lookup_cpu(v, indices, weights, sparse_grad=True, impl=impl).backward(grad_out)
    torch.testing.assert_close(v.grad.to_dense().double(), ref_gv, rtol=1e-5, atol=1e-5)


@pytest.mark.requires_native
def test_cpp_and_torch_paths_agree_on_a_wide_table():
    values, indices, weights, grad_out = make_inputs(4096, 256, 64, 128, seed=7)
    results = []
    for impl in ("cpp", "torch"):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        out = lookup_cpu(v, indices, w, sparse_grad=True, impl=impl)
        out.backward(grad_out)
        results.append((out, v.grad.to_dense(), w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    values = torch.randn(10, 4)
    idx = torch.tensor([[0, 9]])
    w = torch.ones(1, 2)
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        lookup_cpu(values, torch.tensor([[0, 10]]), w)
    with pytest.raises(IndexError, match="min -1"):
        lookup_cpu(values, torch.tensor([[-1, 0]]), w)
    with pytest.raises(ValueError, match="weights must have the shape"):
        lookup_cpu(values, idx, torch.ones(2, 1))
    with pytest.raises(ValueError, match="2-D"):
        lookup_cpu(values[0], idx, w)
    with pytest.raises(TypeError, match="int64"):
        lookup_cpu(values, idx.float(), w)
    with pytest.raises(ValueError, match="impl must be one of"):
        lookup_cpu(values, idx, w, impl="cuda")


def test_build_failure_falls_back_to_torch_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_native", {})
    monkeypatch.setattr(native, "_SOURCES", [tmp_path / "missing.cpp"])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("MEMLAYERS_NO_CPP_EXT", raising=False)
    values, indices, weights, grad_out = make_inputs(20, 5, 3, 4, seed=8)
    with pytest.warns(RuntimeWarning, match="pure-torch path"):
        out = lookup_cpu(values, indices, weights)
    torch.testing.assert_close(out.double(), naive_lookup(values, indices, weights), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once, not on every call
        lookup_cpu(values, indices, weights)
    with pytest.raises(RuntimeError, match="impl='cpp'"):
        lookup_cpu(values, indices, weights, impl="cpp")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dim", [64, 130, 7])
def test_bf16_forward_blocks_and_tail_match_fp32_of_same_values(impl, dim):
    """The forward's column blocks (64 wide), tail columns and cross-bag prefetch, in bf16 with fp32 sums."""
    values, indices, weights, _ = make_inputs(300, dim, 140, 11, seed=3)
    v16 = values.bfloat16()
    out = lookup_cpu(v16, indices, weights, impl=impl)
    ref = naive_lookup(v16.double(), indices, weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_the_cpp_kernels_build_where_ci_requires_them():
    """Every C++ test skips when the extension fails to build (no compiler is a supported setup), so a
    compile error would turn them all into skips. CI sets MEMSCALE_REQUIRE_NATIVE=1: there the build
    must succeed, and its error is shown."""
    import os

    if not os.environ.get("MEMSCALE_REQUIRE_NATIVE"):
        pytest.skip("set MEMSCALE_REQUIRE_NATIVE=1 to require the C++ build (CI does)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = native_available()
    assert ok, "C++ extension did not build: " + "; ".join(str(w.message) for w in caught)[-3000:]
