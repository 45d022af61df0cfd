"""Which value tables are updated lazily, and by which optimizer: the registry the lookup consults.

A table owned by a `RowSparseAdam` holds rows that are behind dense AdamW until they are read. Every
read (`memlayers.lookup`) therefore asks this registry first and lets the owner catch the rows up;
the CPU lookup's backward asks it whether the owner applies its update inside the backward (fused),
and a gradient-norm clip asks it for value gradients an owner holds back until its step (deferred).
Keeping the registry apart from the optimizer lets the lookup ask without importing the optimizer,
so the two never import each other.

The registry holds weak references only: a table or optimizer that is gone reads as a plain table.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from memlayers.optim.row_sparse_adam import RowSparseAdam

__all__ = [
    "catch_up_before_read",
    "deferred_grad_owner",
    "flush_on_state_dict",
    "fused_owner",
    "has_lazy_tables",
    "register_tables",
]

# id(param) -> (weakref to param, weakref to its RowSparseAdam). The lookup consults it on
# every read so stale rows are caught up before they are gathered.
_READERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}
_CATCH_UP: dict[str, Any] = {}


def register_tables(optimizer: RowSparseAdam, params: Iterable[torch.Tensor]) -> None:
    """Record `optimizer` as the lazy owner of `params` until the optimizer is garbage collected."""

    def forget(ref: weakref.ref) -> None:  # the optimizer is gone: its tables read as plain tables
        for key in [k for k, (_, opt_ref) in _READERS.items() if opt_ref is ref]:
            del _READERS[key]

    if "fn" not in _CATCH_UP:
        _CATCH_UP["fn"] = torch.compiler.disable(_catch_up)
    opt_ref = weakref.ref(optimizer, forget)
    for p in params:
        _READERS[id(p)] = (weakref.ref(p), opt_ref)


def has_lazy_tables() -> bool:
    """Whether any live RowSparseAdam owns a table (else reads need no catch-up, and a compiled
    graph can skip the call)."""
    return bool(_READERS)


def catch_up_before_read(values: torch.Tensor, indices: torch.Tensor) -> None:
    """Bring the rows `indices` of `values` up to date if a RowSparseAdam owns `values`.

    Called by :func:`memlayers.lookup` before every read while any RowSparseAdam lives. Data-dependent
    in-place row updates: wrapped in `torch.compiler.disable` (a graph break under torch.compile) by
    the first RowSparseAdam, not at import, because that decorator imports torch._dynamo (and triton).
    """
    _CATCH_UP["fn"](values, indices)


def _catch_up(values: torch.Tensor, indices: torch.Tensor) -> None:
    entry = _READERS.get(id(values))
    if entry is None:
        return
    param, opt = entry[0](), entry[1]()
    if param is not values or opt is None:
        return
    opt.catch_up_rows(values, indices)


def fused_owner(values: torch.Tensor) -> tuple[torch.Tensor, RowSparseAdam] | None:
    """(param, optimizer) when a RowSparseAdam in fused mode owns `values`, else None."""
    entry = _READERS.get(id(values))
    if entry is None:
        return None
    param, opt = entry[0](), entry[1]()
    if param is not values or opt is None or not opt.fused:
        return None
    return param, opt


def deferred_grad_owner(values: torch.Tensor) -> RowSparseAdam | None:
    """The RowSparseAdam holding a deferred gradient of `values` (fused update deferred to its step:
    between the backward and `step()`), else None. Such a table has no `.grad`; its gradient's norm
    and clip scale go through the owner (`deferred_grad_sq_norm`, `scale_deferred_grad`)."""
    entry = _READERS.get(id(values))
    if entry is None:
        return None
    param, opt = entry[0](), entry[1]()
    if param is not values or opt is None or not opt.has_deferred_grad(values):
        return None
    return opt


def flush_on_state_dict(module: torch.nn.Module, optimizer: RowSparseAdam) -> None:
    """Make `module.state_dict()` (and any parent's) flush `optimizer` first, so checkpoints and
    exports of the module hold every row caught up (dense AdamW's values)."""
    ref = weakref.ref(optimizer)

    def hook(*_args, **_kwargs) -> None:
        opt = ref()
        if opt is not None:
            opt.flush()

    module.register_state_dict_pre_hook(hook)
