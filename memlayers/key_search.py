"""Product-key search on CPU: sub-key scores, each half's top-K and the K best sums, as one op
whose gradient is K-sparse.

    top_s[t, h, c, k] = q[t, h, c] · keys[h, c, top_i[t, h, c, k]]

The search needs every sub-key score (T, H, 2, N), but only the K selected per half reach the loss.
Written as `einsum` + `gather` (the portable path in `ProductKeyMemory.select`), autograd keeps the
(T, H, 2, N) scores' layout work and a dense gradient of that size: at the 20M memory model's shape
(2,048 tokens x 4 heads x 2 halves x 1,024 sub-keys, fp32) that is a 67 MB permuted copy for the C++
search, a 67 MB zero gradient to scatter into, and two batched matmuls over it, per layer and step.
Here the scores are written by one matmul per (head, half) straight into a reused (T, H, 2, N)
buffer (no copy, no fresh pages to fault in), and the backward sums the K selected sub-keys per row
(`memlayers_cpu::selected_scores_backward`): N/K times less work than the dense gradient.

Both ops are `torch.library` custom ops with fake implementations, so `torch.compile(fullgraph=True)`
sees them without a graph break. Without the C++ extension the same results come from torch ops.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from memlayers.native import native_ops

__all__ = ["product_key_topk_op", "product_topk_op", "selected_scores_backward_op"]

# The scores buffer is reused across calls (per thread: autograd's backward may recompute a checkpointed
# forward on another thread). Above this size a call allocates its own instead of pinning it for the
# process's lifetime (an eval pass with a large batch would otherwise keep gigabytes).
_SCRATCH_MAX_BYTES = 256 << 20
_scratch = threading.local()


def _scores_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    numel = math.prod(shape)
    if numel * torch.finfo(dtype).bits // 8 > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    buf = getattr(_scratch, "scores", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        _scratch.scores = buf
    return buf[:numel].view(shape)


def sub_key_scores(q: Tensor, keys: Tensor, out: Tensor) -> Tensor:
    """out[t, h, c, n] = q[t, h, c] · keys[h, c, n]: one matmul per (head, half), written in place into
    `out`'s strided (T, N) slices (BLAS takes the row stride; no permuted copy)."""
    for h in range(q.shape[1]):
        for c in range(2):
            torch.mm(q[:, h, c], keys[h, c].t(), out=out[:, h, c])
    return out


@torch.library.custom_op("memlayers::product_topk_cpu", mutates_args=(), device_types="cpu")
def product_topk_op(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(..., 2, N) fp32/fp64 scores -> (each half's top-k ids (..., 2, k), flat positions a*k + b of the k
    best sums top1[a] + top2[b] (..., k)), both in descending score order. The C++ kernel when it builds,
    else two torch.topk (the decision is made here, inside the op, so compiled graphs need no guard)."""
    ops = native_ops()
    if ops is not None:
        return ops.product_topk(scores, k)
    top_s, top_i = scores.topk(k, dim=-1)
    cand = (top_s[..., 0, :, None] + top_s[..., 1, None, :]).flatten(-2)
    return top_i, cand.topk(k, dim=-1).indices


@product_topk_op.register_fake
def _product_topk_fake(scores, k):
    return scores.new_empty((*scores.shape[:-1], k), dtype=torch.int64), scores.new_empty(
        (*scores.shape[:-2], k), dtype=torch.int64
    )


@torch.library.custom_op("memlayers::product_key_topk_cpu", mutates_args=(), device_types="cpu")
def product_key_topk_op(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (T, H, 2, half), keys (H, 2, N, half), fp32/fp64 -> (top_s (T, H, 2, k) each half's top-k
    scores, top_i (T, H, 2, k) their sub-key ids, best_pos (T, H, k) flat positions a*k + b of the k best
    sums top_s[..., 0, a] + top_s[..., 1, b]), all in descending score order (`product_topk_op`'s
    order). Differentiable in q and keys through top_s."""
    T, H, _, _ = q.shape
    scores = sub_key_scores(q, keys, _scores_buffer((T, H, 2, keys.shape[2]), q.dtype))
    top_i, best_pos = product_topk_op(scores, k)
    return scores.gather(-1, top_i), top_i, best_pos


@product_key_topk_op.register_fake
def _product_key_topk_fake(q, keys, k):
    T, H = q.shape[0], q.shape[1]
    return (
        q.new_empty((T, H, 2, k)),
        q.new_empty((T, H, 2, k), dtype=torch.int64),
        q.new_empty((T, H, k), dtype=torch.int64),
    )


@torch.library.custom_op("memlayers::selected_scores_backward_cpu", mutates_args=(), device_types="cpu")
def selected_scores_backward_op(
    grad: Tensor, q: Tensor, keys: Tensor, top_i: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of top_s = (q · keys) gathered at top_i: grad (T, H, 2, k) -> (grad_q like q, grad_keys
    like keys). The C++ kernel sums the k selected sub-keys per row; the torch path scatters into a
    dense score gradient."""
    T, H, _, half = q.shape
    N, k = keys.shape[2], top_i.shape[-1]
    ops = native_ops()
    if ops is not None:
        grad_q, grad_keys = ops.selected_scores_backward(
            grad.contiguous().view(T, 2 * H, k),
            q.contiguous().view(T, 2 * H, half),
            keys.contiguous().view(2 * H, N, half),
            top_i.contiguous().view(T, 2 * H, k),
        )
        return grad_q.view(q.shape), grad_keys.view(keys.shape)
    dense = grad.new_zeros((T, H, 2, N)).scatter_(-1, top_i, grad)  # a half's top-k ids are distinct
    return torch.einsum("thcn,hcnd->thcd", dense, keys), torch.einsum("thcn,thcd->hcnd", dense, q)


@selected_scores_backward_op.register_fake
def _selected_scores_backward_fake(grad, q, keys, top_i):
    return torch.empty_like(q), torch.empty_like(keys)


def _setup(ctx, inputs, output) -> None:
    q, keys, _ = inputs
    ctx.save_for_backward(q, keys, output[1])


def _backward(ctx, grad_top_s, _grad_top_i, _grad_best_pos):
    q, keys, top_i = ctx.saved_tensors
    if grad_top_s is None:
        return None, None, None
    grad_q, grad_keys = selected_scores_backward_op(grad_top_s, q, keys, top_i)
    return grad_q, grad_keys, None


product_key_topk_op.register_autograd(_backward, setup_context=_setup)
