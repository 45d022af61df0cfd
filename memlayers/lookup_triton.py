"""Triton kernels for the weighted bag lookup (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

    out[b] = sum_k w[b, k] * values[idx[b, k]]

- forward: one program per (bag, column block); loops over the bag's K entries, fp32 accumulator,
  masked tail so any Dv works.
- grad_weights[b, k] = <grad_out[b], values[idx[b, k]]>: one program per (b, k), a gather-dot over
  column blocks; no (B, K, Dv) intermediate.
- grad_values without float atomics: sort the flat slot ids, compress them into CSR form (unique slots,
  segment offsets), and give each (unique slot, column block) one program that sums w * grad_out over
  the slot's occurrences. Every output row is written by exactly one program, so the result is
  deterministic, and it is naturally a coalesced row-sparse gradient (``sparse=True`` returns it as one).

Import this module only after deciding on ``TRITON_INTERPRET``: triton reads it when the kernels are
decorated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_BLOCK_D = 256


@triton.jit
def _bag_forward_kernel(
    values_ptr, idx_ptr, w_ptr, out_ptr,
    K, D, stride_v, stride_out,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bag = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for k in range(K):
        slot = tl.load(idx_ptr + bag * K + k).to(tl.int64)
        w = tl.load(w_ptr + bag * K + k).to(ACC)
        row = tl.load(values_ptr + slot * stride_v + cols, mask=mask, other=0.0).to(ACC)
        acc += w * row
    tl.store(out_ptr + bag * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weights_kernel(
    values_ptr, idx_ptr, gout_ptr, gw_ptr,
    K, D, stride_v, stride_g,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0).to(tl.int64)  # flat (b, k)
    bag = pair // K
    slot = tl.load(idx_ptr + pair).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        row = tl.load(values_ptr + slot * stride_v + cols, mask=mask, other=0.0).to(ACC)
        g = tl.load(gout_ptr + bag * stride_g + cols, mask=mask, other=0.0).to(ACC)
        acc += row * g
    tl.store(gw_ptr + pair, tl.sum(acc, axis=0).to(gw_ptr.dtype.element_ty))


@triton.jit
def _grad_values_kernel(
    perm_ptr, seg_ptr, w_ptr, gout_ptr, grow_ptr,
    K, D, stride_g, stride_row,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    u = tl.program_id(0).to(tl.int64)  # one unique slot
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for j in range(start, end):
        pair = tl.load(perm_ptr + j).to(tl.int64)  # flat (b, k) position of this occurrence
        bag = pair // K
        w = tl.load(w_ptr + pair).to(ACC)
        g = tl.load(gout_ptr + bag * stride_g + cols, mask=mask, other=0.0).to(ACC)
        acc += w * g
    tl.store(grow_ptr + u * stride_row + cols, acc.to(grow_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype) -> tl.dtype:
    # fp32 accumulation for fp32/bf16/fp16 tables; fp64 tables keep fp64 (reference tests).
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), _MAX_BLOCK_D)


def bag_forward(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """(N, Dv), (B, K), (B, K) -> (B, Dv) in values.dtype."""
    B, K = indices.shape
    D = values.shape[1]
    out = torch.empty(B, D, device=values.device, dtype=values.dtype)
    if B == 0 or D == 0:
        return out.zero_()
    block = _block_d(D)
    _bag_forward_kernel[(B, triton.cdiv(D, block))](
        values, indices, weights, out, K, D, values.stride(0), out.stride(0),
        BLOCK_D=block, ACC=_acc(values.dtype),
    )  # fmt: skip
    return out


def bag_grad_weights(values: Tensor, indices: Tensor, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    """grad_weights[b, k] = <grad_out[b], values[indices[b, k]]>, shape (B, K)."""
    B, K = indices.shape
    D = values.shape[1]
    gw = torch.empty(B, K, device=values.device, dtype=dtype)
    if gw.numel() == 0:
        return gw
    if D == 0:
        return gw.zero_()
    _grad_weights_kernel[(B * K,)](
        values, indices, grad_out, gw, K, D, values.stride(0), grad_out.stride(0),
        BLOCK_D=_block_d(D), ACC=_acc(values.dtype),
    )  # fmt: skip
    return gw


def bag_grad_values_rows(indices: Tensor, weights: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """Coalesced value gradient: (unique slots (U,), their gradient rows (U, Dv)) in grad_out.dtype."""
    K = indices.shape[1]
    D = grad_out.shape[1]
    flat = indices.reshape(-1)
    sorted_slots, perm = torch.sort(flat, stable=True)
    unique, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    seg = torch.zeros(unique.numel() + 1, device=flat.device, dtype=torch.int64)
    torch.cumsum(counts, dim=0, out=seg[1:])
    rows = torch.empty(unique.numel(), D, device=grad_out.device, dtype=grad_out.dtype)
    if rows.numel() == 0:
        return unique.to(torch.int64), rows
    block = _block_d(D)
    _grad_values_kernel[(unique.numel(), triton.cdiv(D, block))](
        perm, seg, weights, grad_out, rows, K, D, grad_out.stride(0), rows.stride(0),
        BLOCK_D=block, ACC=_acc(grad_out.dtype),
    )  # fmt: skip
    return unique.to(torch.int64), rows


def _dense_rows(values: Tensor, slots: Tensor, rows: Tensor) -> Tensor:
    """The dense value gradient from the coalesced one. Slots are unique, so this is a plain scatter:
    no accumulation, no atomics."""
    return torch.zeros_like(values).index_copy_(0, slots, rows)


class _TritonBagLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weights: Tensor, sparse: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, indices, weights)
        ctx.sparse = sparse
        return bag_forward(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        values, indices, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = bag_grad_weights(values, indices, grad_out, weights.dtype)
        if ctx.needs_input_grad[0]:
            slots, rows = bag_grad_values_rows(indices, weights, grad_out.to(values.dtype))
            if ctx.sparse:
                grad_values = torch.sparse_coo_tensor(
                    slots.unsqueeze(0), rows, values.shape, is_coalesced=True, check_invariants=False
                )
            else:
                grad_values = _dense_rows(values, slots, rows)
        return grad_values, None, grad_weights, None


def lookup_triton(values: Tensor, indices: Tensor, weights: Tensor, *, sparse: bool = False) -> Tensor:
    """Triton weighted bag lookup; same contract as :func:`memlayers.lookup` (inputs already validated,
    weights already in values.dtype). Slot ids are NOT bounds-checked here (a device-side check would
    cost a sync); :func:`memlayers.lookup` callers get that from the selection, which cannot go out of range.
    """
    if values.stride(-1) != 1:
        values = values.contiguous()
    return _TritonBagLookup.apply(values, indices.contiguous(), weights.contiguous(), sparse)


# ----------------------------------------------------------------------------- torch.compile

# The same kernels as torch.library custom ops with fake (meta) kernels and autograd, so a compiled
# graph keeps them as opaque nodes (no graph break, no swap to embedding_bag). Under compile the value
# gradient is dense: a sparse gradient's row count is data-dependent, which a fake kernel cannot express.


@torch.library.custom_op("memlayers::bag_sum_triton", mutates_args=())
def bag_sum_triton_op(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """(N, D) table, (B, K) int64 ids, (B, K) weights in values' dtype -> (B, D) in values' dtype."""
    return bag_forward(values, indices, weights)


@bag_sum_triton_op.register_fake
def _bag_sum_triton_fake(values, indices, weights):
    return values.new_empty(indices.shape[0], values.shape[1])


@torch.library.custom_op("memlayers::bag_sum_triton_backward", mutates_args=())
def bag_sum_triton_backward_op(
    values: Tensor, indices: Tensor, weights: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor]:
    """(dense value grad in values' dtype, weight grad in weights' dtype)."""
    grad_weights = bag_grad_weights(values, indices, grad_out, weights.dtype)
    slots, rows = bag_grad_values_rows(indices, weights, grad_out.to(values.dtype))
    return _dense_rows(values, slots, rows), grad_weights


@bag_sum_triton_backward_op.register_fake
def _bag_sum_triton_backward_fake(values, indices, weights, grad_out):
    return torch.empty_like(values), torch.empty_like(weights)


def _triton_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _triton_backward(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    grad_values, grad_weights = bag_sum_triton_backward_op(values, indices, weights, grad_out.contiguous())
    return grad_values, None, grad_weights


bag_sum_triton_op.register_autograd(_triton_backward, setup_context=_triton_setup)


def lookup_triton_compilable(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """`lookup_triton` (dense value grad) through the custom ops: what `memlayers.lookup` runs while
    torch.compile traces."""
    return bag_sum_triton_op(values.contiguous(), indices.contiguous(), weights.contiguous())
