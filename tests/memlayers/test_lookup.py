"""memlayers.lookup: the public dispatcher and its torch path vs a naive loop-gather."""

from __future__ import annotations

import pytest
import torch

from memlayers import lookup
from memlayers.lookup import ENV_VAR, _resolve_impl
from memlayers.reference import reference_lookup


def _inputs(n: int, d: int, b: int, k: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    indices = torch.randint(0, n, (b, k), generator=g)
    weights = torch.rand(b, k, generator=g, dtype=dtype).requires_grad_()
    return values, indices, weights


def _fwd_bwd(fn, values, indices, weights, grad_out):
    values.grad = weights.grad = None
    out = fn(values, indices, weights)
    out.backward(grad_out)
    gv = values.grad.to_dense() if values.grad.is_sparse else values.grad
    return out.detach(), gv.clone(), weights.grad.clone()


@pytest.mark.parametrize("impl", ["torch", "cpu", "auto"])
@pytest.mark.parametrize("shape", [(10, 7, 5, 4), (6, 37, 9, 1), (50, 16, 3, 12)])
def test_matches_reference_forward_backward(impl, shape):
    n, d, b, k = shape
    values, indices, weights = _inputs(n, d, b, k)
    # Repeated slots within one bag and across bags.
    indices[0, -1] = indices[0, 0]
    indices[-1, 0] = indices[0, 0]
    grad_out = torch.randn(b, d, dtype=values.dtype)
    got = _fwd_bwd(lambda v, i, w: lookup(v, i, w, impl=impl), values, indices, weights, grad_out)
    ref = _fwd_bwd(reference_lookup, values, indices, weights, grad_out)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


def test_sparse_grad_equals_dense_grad():
    values, indices, weights = _inputs(30, 8, 6, 5)
    indices[1, 2] = indices[1, 3] = indices[4, 0]
    grad_out = torch.randn(6, 8, dtype=values.dtype)
    lookup(values, indices, weights, sparse=True, impl="torch").backward(grad_out)
    assert values.grad.is_sparse
    sparse_grad = values.grad.to_dense()
    values.grad = None
    lookup(values, indices, weights, impl="torch").backward(grad_out)
    assert not values.grad.is_sparse
    torch.testing.assert_close(sparse_grad, values.grad)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_bf16_table_with_fp32_weights_reads_fp32(impl):
    values = torch.randn(10, 4, dtype=torch.bfloat16)
    out = lookup(values, torch.tensor([[1, 2]]), torch.tensor([[0.25, 0.75]]), impl=impl)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out[0], 0.25 * values[1].float() + 0.75 * values[2].float(), atol=1e-2, rtol=1e-2
    )
    assert (
        lookup(values, torch.tensor([[1, 2]]), torch.tensor([[0.25, 0.75]]).bfloat16(), impl=impl).dtype
        == torch.bfloat16
    )


def test_int32_indices_accepted():
    values, indices, weights = _inputs(12, 5, 3, 4)
    torch.testing.assert_close(
        lookup(values, indices.int(), weights), reference_lookup(values, indices, weights)
    )


def test_empty_batch_and_empty_bags():
    values, _, _ = _inputs(10, 6, 1, 1)
    out = lookup(values, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=values.dtype))
    assert out.shape == (0, 6)
    # K = 0: every bag is empty -> zeros, still differentiable (zero grads).
    w = torch.zeros(3, 0, dtype=values.dtype, requires_grad=True)
    out = lookup(values, torch.zeros(3, 0, dtype=torch.long), w)
    assert out.shape == (3, 6) and torch.count_nonzero(out) == 0
    out.sum().backward()
    assert values.grad is not None and torch.count_nonzero(values.grad) == 0


@pytest.mark.parametrize(
    "values, indices, weights, match",
    [
        (torch.randn(10), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), "values must be 2-D"),
        (torch.randn(10, 3), torch.zeros(4, dtype=torch.long), torch.ones(4), "indices must be 2-D"),
        (torch.randn(10, 3), torch.zeros(2, 2), torch.ones(2, 2), "indices must be int64"),
        (torch.randn(10, 3), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 3), "weights shape"),
        (
            torch.randn(10, 3),
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(2, 2, dtype=torch.long),
            "weights must be a float",
        ),
        (
            torch.zeros(10, 3, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(2, 2),
            "values must be a float",
        ),
    ],
)
def test_bad_inputs_raise(values, indices, weights, match):
    with pytest.raises(ValueError, match=match):
        lookup(values, indices, weights)


def test_out_of_range_index_raises():
    with pytest.raises((IndexError, RuntimeError)):
        lookup(torch.randn(4, 3), torch.tensor([[4]]), torch.ones(1, 1), impl="torch")


def test_impl_resolution(monkeypatch):
    cpu_values = torch.zeros(2, 2)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert _resolve_impl("auto", cpu_values) == "cpu"
    assert _resolve_impl("torch", cpu_values) == "torch"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert _resolve_impl("auto", cpu_values) == "torch"
    # An explicit impl wins over the env var.
    assert _resolve_impl("cpu", cpu_values) == "cpu"
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        _resolve_impl("auto", cpu_values)
    with pytest.raises(ValueError, match="impl must be one of"):
        _resolve_impl("cuda", cpu_values)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton", exc_type=ImportError)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lookup(torch.randn(4, 3), torch.tensor([[1]]), torch.ones(1, 1), impl="triton")
