"""Weighted bag lookup into a value table: the memory layer's hot path.

``lookup(values, indices, weights)`` computes, for every bag b,

    out[b] = sum_k weights[b, k] * values[indices[b, k]]

with autograd to both ``values`` and ``weights``. Implementations:

- ``"torch"``:  ``F.embedding_bag(mode="sum", per_sample_weights=...)``; runs anywhere.
- ``"cpu"``:    the C++ CPU kernels (``memlayers/lookup_cpu.py``; their torch fallback without a compiler).
- ``"triton"``: the Triton kernels in ``memlayers/lookup_triton.py`` (CUDA, or CPU tensors under
                ``TRITON_INTERPRET=1`` for testing).
- ``"auto"``:   Triton on CUDA when triton imports, the CPU fast path on CPU, torch otherwise.

The ``MEMLAYERS_LOOKUP_IMPL`` environment variable overrides ``impl="auto"`` (handy for forcing a
path in tests and benchmarks without touching model code).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from memlayers.checks import check_lookup_inputs
from memlayers.optim.lazy_tables import catch_up_before_read, has_lazy_tables

IMPLS = ("auto", "torch", "cpu", "triton")
ENV_VAR = "MEMLAYERS_LOOKUP_IMPL"


def lookup(
    values: Tensor,
    indices: Tensor,
    weights: Tensor,
    *,
    sparse: bool = False,
    impl: str = "auto",
) -> Tensor:
    """Weighted sum of value rows per bag.

    Args:
        values:  (N_slots, Dv) float table.
        indices: (B, K) integer slot ids in [0, N_slots).
        weights: (B, K) float weights (the CPU kernels use them in fp32; the torch and Triton paths cast
                 them to ``values.dtype``).
        sparse:  produce a sparse (row) gradient for ``values`` instead of a dense one.
        impl:    "auto" | "torch" | "cpu" | "triton" (see module docstring).

    Returns:
        (B, Dv) tensor of dtype ``promote_types(values.dtype, weights.dtype)`` (a bf16 table read with
        fp32 weights gives fp32): ``out[b] = sum_k weights[b, k] * values[indices[b, k]]``.
    """
    _check_inputs(values, indices, weights)
    impl = _resolve_impl(impl, values)
    # A table trained by RowSparseAdam holds rows that are behind dense AdamW until read: bring the
    # rows about to be read up to date first (a dictionary miss for any other table).
    if has_lazy_tables():
        catch_up_before_read(values, indices)
    # bf16/fp16 tables read with fp32 weights give an fp32 read (the CPU kernels accumulate in fp32
    # and return it as is; the other paths run in the table's dtype and are cast up).
    out_dtype = torch.promote_types(values.dtype, weights.dtype)
    if impl == "cpu" and indices.shape[1] > 0:
        return _cpu_lookup(values, indices, weights, sparse).to(out_dtype)
    weights = weights.to(values.dtype)
    if indices.shape[1] == 0:
        # embedding_bag rejects empty bags of width 0; the gather form gives zeros that stay in the graph.
        return torch.einsum("bk,bkd->bd", weights, values[indices]).to(out_dtype)
    if impl == "triton":
        from memlayers.lookup_triton import lookup_triton, lookup_triton_compilable

        if torch.compiler.is_compiling():  # custom ops: one graph node each way, dense value gradient
            return lookup_triton_compilable(values, indices, weights).to(out_dtype)
        return lookup_triton(values, indices, weights, sparse=sparse).to(out_dtype)
    return torch_lookup(values, indices, weights, sparse=sparse).to(out_dtype)


def torch_lookup(values: Tensor, indices: Tensor, weights: Tensor, *, sparse: bool = False) -> Tensor:
    """The stock path: ``F.embedding_bag`` in sum mode with per-sample weights."""
    return F.embedding_bag(indices, values, mode="sum", per_sample_weights=weights, sparse=sparse)


def _cpu_lookup(values: Tensor, indices: Tensor, weights: Tensor, sparse: bool) -> Tensor:
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch_lookup(
            values, indices, weights.to(values.dtype), sparse=sparse
        )  # the kernels' dtypes only
    from memlayers.lookup_cpu import lookup_cpu, lookup_cpu_compilable

    if torch.compiler.is_compiling():
        # Custom ops with fake kernels: one graph node each way, dense value gradient (see lookup_cpu).
        return lookup_cpu_compilable(values, indices, weights)

    # C++ kernels (coalesced row-sparse grads) when they build, else lookup_cpu's torch path.
    return lookup_cpu(values, indices, weights, sparse_grad=sparse)


@functools.cache
def triton_available() -> bool:
    """True when triton imports (the kernels themselves are only imported on first use)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the torch path
        return False
    return True


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _resolve_impl(impl: str, values: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"lookup: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "auto")
        if impl not in IMPLS:
            raise ValueError(f"lookup: ${ENV_VAR} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if values.is_cuda:
            return "triton" if triton_available() else "torch"
        return "cpu" if values.device.type == "cpu" else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("lookup: impl='triton' but triton is not installed (pip install triton)")
        if not values.is_cuda and not _triton_interpreting():
            raise RuntimeError(
                "lookup: impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported to run on CPU; got values on {values.device}"
            )
    if impl == "cpu" and values.device.type != "cpu":
        raise RuntimeError(f"lookup: impl='cpu' needs CPU tensors, got values on {values.device}")
    return impl


def _check_inputs(values: Tensor, indices: Tensor, weights: Tensor) -> None:
    check_lookup_inputs(values, indices, weights, "lookup")
    if indices.device != values.device or weights.device != values.device:
        raise ValueError(
            "lookup: values, indices and weights must be on one device, got "
            f"{values.device}, {indices.device}, {weights.device}"
        )
