"""The CPU product-key search op (memlayers/key_search.py) against einsum + gather + autograd."""

from __future__ import annotations

import pytest
import torch

from memlayers import key_search
from memlayers.key_search import product_key_topk_op, product_topk_op, selected_scores_backward_op


def _inputs(T, H, half, N, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 2, half, dtype=dtype, generator=gen, requires_grad=True)
    keys = torch.randn(H, 2, N, half, dtype=dtype, generator=gen, requires_grad=True)
    return q, keys


def _dense_reference(q, keys, k):
    """The portable path: all scores by einsum, the op's ids, and autograd through a gather."""
    scores = torch.einsum("thcd,hcnd->thcn", q, keys)
    top_i, best_pos = product_topk_op(scores.detach().contiguous(), k)
    return scores.gather(-1, top_i), top_i, best_pos


SHAPES = [(37, 2, 8, 16, 4), (5, 4, 7, 33, 33), (64, 1, 16, 50, 1), (0, 2, 4, 8, 3), (19, 3, 5, 64, 16)]


@pytest.mark.parametrize("T, H, half, N, k", SHAPES)
@pytest.mark.parametrize("native", [pytest.param(True, marks=pytest.mark.requires_native), False])
def test_forward_and_gradients_equal_the_dense_route(T, H, half, N, k, native, monkeypatch):
    """top_s, ids and positions equal einsum + product_topk + gather; grad_q and grad_keys equal autograd
    through the dense (T, H, 2, N) scores, fp64 (tight) — with the C++ kernel and with the torch path."""
    if not native:
        monkeypatch.setattr(key_search, "native_ops", lambda: None)
    q, keys = _inputs(T, H, half, N, torch.float64, seed=T + N)
    top_s, top_i, best_pos = product_key_topk_op(q, keys, k)
    ref_s, ref_i, ref_pos = _dense_reference(q, keys, k)
    assert torch.equal(top_i, ref_i) and torch.equal(best_pos, ref_pos)
    torch.testing.assert_close(top_s, ref_s, rtol=1e-14, atol=1e-14)
    g = torch.randn(top_s.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    gq, gk = torch.autograd.grad(top_s, (q, keys), g)
    rq, rk = torch.autograd.grad(ref_s, (q, keys), g)
    torch.testing.assert_close(gq, rq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gk, rk, rtol=1e-12, atol=1e-12)


@pytest.mark.requires_native
def test_backward_kernel_against_naive_loops_fp32_with_repeated_sub_keys():
    """Many rows pick the same sub-keys (N small), so grad_keys sums many rows into one; fp32 against
    naive Python loops in float64."""
    T, H, half, N, k = 23, 2, 5, 6, 4
    q, keys = _inputs(T, H, half, N, torch.float32, seed=3)
    top_i = torch.stack(
        [torch.randperm(N, generator=torch.Generator().manual_seed(i))[:k] for i in range(T * H * 2)]
    )
    top_i = top_i.view(T, H, 2, k)
    grad = torch.randn(T, H, 2, k, generator=torch.Generator().manual_seed(9))
    gq, gk = selected_scores_backward_op(grad, q.detach(), keys.detach(), top_i)
    rq = torch.zeros(T, H, 2, half, dtype=torch.float64)
    rk = torch.zeros(H, 2, N, half, dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            for c in range(2):
                for j in range(k):
                    n = int(top_i[t, h, c, j])
                    rq[t, h, c] += float(grad[t, h, c, j]) * keys[h, c, n].double().detach()
                    rk[h, c, n] += float(grad[t, h, c, j]) * q[t, h, c].double().detach()
    torch.testing.assert_close(gq.double(), rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gk.double(), rk, rtol=1e-5, atol=1e-5)


@pytest.mark.requires_native
def test_backward_does_not_depend_on_the_thread_count():
    q, keys = _inputs(300, 4, 8, 64, torch.float32, seed=1)
    top_s, top_i, _ = product_key_topk_op(q, keys, 8)
    grad = torch.randn(top_s.shape, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = selected_scores_backward_op(grad, q.detach(), keys.detach(), top_i)
    finally:
        torch.set_num_threads(threads)
    many = selected_scores_backward_op(grad, q.detach(), keys.detach(), top_i)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_reused_score_buffer_never_leaks_into_earlier_results():
    """The scores buffer is reused: outputs of one call stay as they were after calls of another shape
    and dtype (and a call above the buffer cap gets its own memory)."""
    q, keys = _inputs(11, 2, 4, 16, torch.float32, seed=5)
    first = [t.clone() for t in product_key_topk_op(q, keys, 4)]
    kept = product_key_topk_op(q, keys, 4)
    for args in [
        (_inputs(40, 3, 4, 32, torch.float32, seed=6), 5),
        (_inputs(7, 2, 4, 16, torch.float64, seed=7), 2),
    ]:
        product_key_topk_op(*args[0], args[1])
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


@pytest.mark.requires_native
def test_backward_rejects_out_of_range_ids():
    q, keys = _inputs(3, 1, 4, 8, torch.float32)
    top_i = torch.full((3, 1, 2, 2), 8)
    with pytest.raises(RuntimeError, match="out of range"):
        selected_scores_backward_op(torch.ones(3, 1, 2, 2), q.detach(), keys.detach(), top_i)


def test_ops_pass_opcheck():
    q, keys = _inputs(9, 2, 4, 12, torch.float32, seed=8)
    torch.library.opcheck(product_key_topk_op, (q, keys, 3))
    top_s, top_i, _ = product_key_topk_op(q, keys, 3)
    torch.library.opcheck(
        selected_scores_backward_op, (torch.randn(top_s.shape), q.detach(), keys.detach(), top_i)
    )
