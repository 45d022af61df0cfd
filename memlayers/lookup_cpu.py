"""Fast CPU weighted-bag lookup with coalesced row-sparse value gradients.

    out[b] = sum_k weights[b, k] * values[indices[b, k]]

`F.embedding_bag` computes the same forward, but its sparse backward writes one gradient
row per *read* (524k rows for 4096 bags of 128 slots), uncoalesced, and the weight
gradient gathers every row again into a (B, K, Dv) temporary. Here the backward groups
the reads by slot (one stable sort of the indices) and makes ONE pass over the unique
rows: each value row is read once, its dot products with the bag gradients give
grad_weights, and its summed gradient row is written once. The value gradient comes out
as a coalesced `torch.sparse_coo_tensor` (sorted unique rows, summed row grads), which is
what `RowSparseAdam` consumes, or dense on request.

The kernels are C++ (memlayers/csrc/bag_forward.cpp, bag_backward.cpp, parallel over the torch
intra-op thread pool), built on first use by `memlayers.native` and cached in
TORCH_EXTENSIONS_DIR (~30 s on a 2-core machine). Without a compiler, or with
MEMLAYERS_NO_CPP_EXT=1, a pure-torch path computes the same thing (stable sort + one
`embedding_bag` over the bag gradients per unique row) and a warning says so.

Dtypes: values fp32/bf16/fp16, weights any float dtype; accumulation is always fp32. The
output has dtype `promote_types(values.dtype, weights.dtype)`, so bf16 values read with
fp32 softmax weights give an fp32 read.

Accumulating sparse gradients: when two backward passes add into `values.grad`, autograd
sums two coalesced sparse tensors into an UNcoalesced one (indices concatenated).
`RowSparseAdam` coalesces such a gradient before its step; stock `torch.optim.SparseAdam`
does the same. Stock dense optimizers (AdamW) reject sparse gradients: use
`sparse_grad=False` with them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from memlayers.checks import check_lookup_inputs

# product_topk_op (the key search's op) and _isa_flags (the build flags) stay importable from here for
# benchmarks/, which imported them from this module before memlayers.native and key_search held them.
from memlayers.key_search import product_topk_op  # noqa: F401
from memlayers.native import DISABLE_ENV, _isa_flags, native_available, native_ops  # noqa: F401
from memlayers.optim.lazy_tables import fused_owner

__all__ = ["lookup_cpu", "lookup_cpu_compilable", "native_available", "native_ops"]

_IMPLS = ("auto", "cpp", "torch")
# Upper bound on the (bags, K, Dv) fp32 temporary of the torch fallback's gathers.
_FALLBACK_CHUNK_BYTES = 32 << 20


# ----------------------------------------------------------------------------- torch path


def _bag_chunk(n_bags: int, k: int, dim: int) -> int:
    return max(1, min(n_bags, _FALLBACK_CHUNK_BYTES // max(1, k * dim * 4)))


def _torch_forward(values: torch.Tensor, indices: torch.Tensor, weights32: torch.Tensor) -> torch.Tensor:
    if values.dtype == torch.float32:
        return F.embedding_bag(indices, values, mode="sum", per_sample_weights=weights32)
    # embedding_bag needs weights in the table's dtype; gather in fp32 instead.
    n_bags, k = indices.shape
    out = values.new_empty(n_bags, values.shape[1], dtype=torch.float32)
    step = _bag_chunk(n_bags, k, values.shape[1])
    for s in range(0, n_bags, step):
        rows = values[indices[s : s + step]].float()
        torch.bmm(weights32[s : s + step, None, :], rows, out=out[s : s + step, None, :])
    return out


def _torch_backward(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights32: torch.Tensor,
    grad_out32: torch.Tensor,
    need_values_grad: bool,
    need_weights_grad: bool,
    dense: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    n_bags, k = indices.shape
    dim = values.shape[1]
    rows = grad_rows = grad_w = None
    if need_weights_grad:
        # Gather-dot in chunks: never the whole (B, K, Dv) gather at once.
        grad_w = weights32.new_empty(n_bags, k)
        step = _bag_chunk(n_bags, k, dim)
        for s in range(0, n_bags, step):
            gathered = values[indices[s : s + step]].float()
            torch.bmm(gathered, grad_out32[s : s + step, :, None], out=grad_w[s : s + step, :, None])
    if need_values_grad:
        sorted_rows, perm = indices.reshape(-1).sort(stable=True)
        rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        # Row u's gradient is sum over its reads e of w[e] * grad_out[bag(e)]: itself a
        # weighted bag over the table grad_out, one bag per unique row.
        offsets = counts.cumsum(0) - counts
        summed = F.embedding_bag(
            perm // k, grad_out32, offsets, mode="sum", per_sample_weights=weights32.reshape(-1)[perm]
        ).to(values.dtype)
        if dense:
            grad_rows = torch.zeros_like(values).index_copy_(0, rows, summed)
            rows = None
        else:
            grad_rows = summed
    return rows, grad_rows, grad_w


# ----------------------------------------------------------------------------- autograd


class _BagSumCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad: bool, use_native: bool):
        weights32 = weights.float().contiguous()
        ops = native_ops() if use_native else None
        if ops is not None:
            out32 = ops.bag_forward(values, indices, weights32)
        else:
            out32 = _torch_forward(values, indices, weights32)
        ctx.save_for_backward(values, indices, weights32)
        # Fused value update: a RowSparseAdam(fused=True) owning `values` takes the value gradient in
        # the backward (stepped there, or kept as this lookup's inputs until its step when deferred), so
        # no gradient tensor is stored in .grad and read back.
        ctx.fused = fused_owner(values) if sparse_grad else None
        ctx.sparse_grad = sparse_grad
        ctx.use_native = ops is not None
        ctx.weights_dtype = weights.dtype
        return out32.to(torch.promote_types(values.dtype, weights.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights32 = ctx.saved_tensors
        need_v, _, need_w = ctx.needs_input_grad[:3]
        if not (need_v or need_w):
            return None, None, None, None, None
        grad_out32 = grad_out.float().contiguous()
        dense = not ctx.sparse_grad
        if need_v and ctx.fused is not None and ctx.fused[1].fuses_backward(ctx.fused[0]):
            # The optimizer step happens inside the backward's loop over the rows: no value gradient.
            param, opt = ctx.fused
            grad_w = opt.fused_backward(param, indices, weights32, grad_out32, need_w)
            return None, None, (grad_w.to(ctx.weights_dtype) if need_w else None), None, None
        if ctx.use_native:
            rows, grad_rows, grad_w = native_ops().bag_backward(
                values, indices, weights32, grad_out32, need_v, need_w, dense
            )
        else:
            rows, grad_rows, grad_w = _torch_backward(
                values, indices, weights32, grad_out32, need_v, need_w, dense
            )
        grad_values = None
        if need_v and ctx.fused is not None:
            param, opt = ctx.fused
            opt.fused_step(param, rows, grad_rows)
        elif need_v:
            if dense:
                grad_values = grad_rows
            else:
                grad_values = torch.sparse_coo_tensor(
                    rows.unsqueeze(0), grad_rows, values.shape, is_coalesced=True, check_invariants=False
                )
        grad_weights = grad_w.to(ctx.weights_dtype) if need_w else None
        return grad_values, None, grad_weights, None, None


def _check_inputs(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    check_lookup_inputs(values, indices, weights, "lookup_cpu")
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"lookup_cpu: values must be float32, bfloat16 or float16, got {values.dtype}")
    for name, t in (("values", values), ("indices", indices), ("weights", weights)):
        if t.device.type != "cpu":
            raise ValueError(f"lookup_cpu needs CPU tensors; {name} is on {t.device}")
    if indices.numel():
        lo, hi = torch.aminmax(indices)
        if lo.item() < 0 or hi.item() >= values.shape[0]:
            raise IndexError(
                f"indices must lie in [0, {values.shape[0]}) (the rows of values); "
                f"got min {lo.item()}, max {hi.item()}"
            )


def lookup_cpu(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    sparse_grad: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Weighted bag sum over rows of `values` on CPU: out[b] = sum_k w[b,k] * values[idx[b,k]].

    Args:
        values: (n_slots, v_dim) table, fp32/bf16/fp16.
        indices: (bags, K) int64 slot ids; repeats within and across bags are fine.
        weights: (bags, K) per-read weights (any float dtype; used in fp32).
        sparse_grad: give `values` a coalesced sparse COO gradient (unique sorted rows)
            instead of a dense (n_slots, v_dim) one. Needs a sparse-aware optimizer
            (`RowSparseAdam`, `torch.optim.SparseAdam`, SGD).
        impl: "auto" (C++ kernels if they build, else torch), "cpp" (error if they do
            not build), or "torch" (the pure-torch path).

    Returns:
        (bags, v_dim) tensor of dtype promote_types(values.dtype, weights.dtype).
    """
    _check_inputs(values, indices, weights, impl)
    if impl == "cpp" and not native_available():
        raise RuntimeError(
            f"impl='cpp' but the C++ extension is unavailable (see the earlier warning, or unset {DISABLE_ENV})"
        )
    indices = indices.long().contiguous()
    values_c = values if values.is_contiguous() else values.contiguous()
    if values_c is not values and values.requires_grad:
        # A strided view would be copied every call and its gradient routed through the copy.
        warnings.warn("lookup_cpu: values is not contiguous; copying it on every call", stacklevel=2)
    return _BagSumCPU.apply(values_c, indices, weights, sparse_grad, impl != "torch")


# ----------------------------------------------------------------------------- torch.compile

# The same kernels as torch.library custom ops with fake (meta) kernels and autograd, so a
# compiled graph keeps them as single opaque nodes (no graph break, no swap to embedding_bag).
# Under compile the value gradient is dense: a sparse gradient's row count is data-dependent,
# which a fake kernel cannot express. RowSparseAdam treats all-zero rows of a dense gradient as
# untouched, so the optimizer math is the same; the fused update is eager-only.


@torch.library.custom_op("memlayers::bag_sum_cpu", mutates_args=(), device_types="cpu")
def bag_sum_op(values: torch.Tensor, indices: torch.Tensor, weights32: torch.Tensor) -> torch.Tensor:
    """(N, D) table, (B, K) int64 ids, (B, K) fp32 weights -> (B, D) fp32 weighted bag sums."""
    ops = native_ops()
    if ops is not None:
        return ops.bag_forward(values, indices, weights32)
    return _torch_forward(values, indices, weights32)


@bag_sum_op.register_fake
def _bag_sum_fake(values, indices, weights32):
    return values.new_empty(indices.shape[0], values.shape[1], dtype=torch.float32)


@torch.library.custom_op("memlayers::bag_sum_cpu_backward", mutates_args=(), device_types="cpu")
def bag_sum_backward_op(
    values: torch.Tensor, indices: torch.Tensor, weights32: torch.Tensor, grad_out32: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense value grad in values' dtype, fp32 weight grad)."""
    ops = native_ops()
    if ops is not None:
        _, grad_values, grad_w = ops.bag_backward(values, indices, weights32, grad_out32, True, True, True)
    else:
        _, grad_values, grad_w = _torch_backward(values, indices, weights32, grad_out32, True, True, True)
    return grad_values, grad_w


@bag_sum_backward_op.register_fake
def _bag_sum_backward_fake(values, indices, weights32, grad_out32):
    return torch.empty_like(values), weights32.new_empty(weights32.shape)


def _bag_sum_setup(ctx, inputs, output):
    values, indices, weights32 = inputs
    ctx.save_for_backward(values, indices, weights32)


def _bag_sum_backward(ctx, grad_out):
    values, indices, weights32 = ctx.saved_tensors
    grad_values, grad_w = bag_sum_backward_op(values, indices, weights32, grad_out.float().contiguous())
    return grad_values, None, grad_w


bag_sum_op.register_autograd(_bag_sum_backward, setup_context=_bag_sum_setup)


def lookup_cpu_compilable(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`lookup_cpu` (dense value grad) through the custom ops: what `memlayers.lookup` runs while
    torch.compile traces. No data-dependent index check (it would break the graph)."""
    out32 = bag_sum_op(values.contiguous(), indices.long().contiguous(), weights.float().contiguous())
    return out32.to(torch.promote_types(values.dtype, weights.dtype))
