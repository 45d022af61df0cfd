"""Row-sparse ("lazy") Adam for memory value tables.

A step touches only the rows present in the gradient; everything else is left exactly
as it is. Per touched row r, at optimizer step t (one counter per parameter, incremented
by every `step()` that sees a gradient for it — the same global counter as
`torch.optim.SparseAdam`, not a per-row count):

    p_r  <- p_r * (1 - lr * weight_decay)                   (decoupled, AdamW-style)
    m_r  <- beta1 * m_r + (1 - beta1) * g_r
    v_r  <- beta2 * v_r + (1 - beta2) * g_r**2
    p_r  <- p_r - lr / (1 - beta1**t) * m_r / (sqrt(v_r) / sqrt(1 - beta2**t) + eps)

How this differs from dense AdamW (torch.optim.AdamW) on the same gradients:
  * untouched rows do not move: dense AdamW keeps moving a row with zero gradient by its
    decaying momentum m/(sqrt(v)+eps), and decays its weights every step;
  * untouched rows' moments do not decay: dense AdamW multiplies m by beta1 and v by beta2
    every step; here a row's moments age only on steps that touch it ("lazy" moments);
  * bias correction uses the global step t, so a row touched for the first time at a
    late step gets a nearly uncorrected first update (as in torch SparseAdam and the
    usual recommender-table Adam);
  * weight decay is decoupled (AdamW) and applied to touched rows only.
On steps where every row is touched the update equals torch.optim.AdamW exactly.

Gradients: a sparse COO gradient with one sparse dim (rows) on a 2-D parameter — from
`lookup_cpu(..., sparse_grad=True)`, `F.embedding_bag(..., sparse=True)` or several
micro-batches of either accumulated (uncoalesced; coalesced here). A dense gradient is
treated the same way: rows whose gradient is entirely zero count as untouched, so
switching a lookup between sparse and dense gradients does not change the training math.
Parameters of other shapes are updated as if their leading dim indexed rows.

Moments are kept dense, in the parameter's dtype (like torch.optim.Adam); the update is
computed in fp32. The in-place row update runs in the C++ kernel from
memlayers/csrc/lookup_cpu.cpp when it is built, else in vectorised torch ops over the
touched rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from memlayers.lookup_cpu import native_ops

__all__ = ["RowSparseAdam"]


def _coalesced_rows(grad: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique sorted rows, summed (U, D) row gradients) from a sparse or dense gradient."""
    if not grad.is_sparse:
        flat = grad.reshape(n_rows, -1)
        rows = flat.ne(0).any(dim=1).nonzero().squeeze(1)
        return rows, flat.index_select(0, rows)
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"RowSparseAdam needs row-sparse gradients (sparse_dim == 1), got sparse_dim {grad.sparse_dim()}"
        )
    idx = grad._indices()[0]
    vals = grad._values().reshape(idx.numel(), -1)
    if grad.is_coalesced() or idx.numel() <= 1:
        return idx, vals
    # Autograd drops the coalesced flag when it stores a gradient in .grad, so check
    # sortedness (cheap) before paying for a sort.
    if bool((idx[1:] > idx[:-1]).all()):
        return idx, vals
    # Accumulated micro-batches: sort once and sum each row's segment with one
    # embedding_bag, much cheaper than Tensor.coalesce() on wide rows.
    sorted_idx, perm = idx.sort(stable=True)
    rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    summed = F.embedding_bag(perm, vals, counts.cumsum(0) - counts, mode="sum")
    return rows, summed


class RowSparseAdam(torch.optim.Optimizer):
    """Adam with decoupled weight decay that updates only the rows a gradient touches.

    See the module docstring for the exact math and how it differs from dense AdamW.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each lie in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ops = native_ops()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() == 0:
                    raise ValueError("RowSparseAdam updates rows; got a 0-dim parameter")
                if not p.is_contiguous():
                    raise ValueError("RowSparseAdam updates rows in place and needs contiguous parameters")
                if p.grad.is_sparse and p.dim() != 2:
                    raise ValueError(f"sparse gradients need a 2-D parameter, got shape {tuple(p.shape)}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                t = state["step"].item()
                bias_correction1 = 1.0 - beta1**t
                bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
                step_size = lr / bias_correction1

                rows, grad_rows = _coalesced_rows(p.grad, p.shape[0])
                if rows.numel() == 0:
                    continue
                grad_rows = grad_rows.to(p.dtype).contiguous()
                p2d = p.view(p.shape[0], -1)
                if ops is not None and p.device.type == "cpu":
                    ops.row_sparse_adam_(
                        p2d, state["exp_avg"].view_as(p2d), state["exp_avg_sq"].view_as(p2d), rows,
                        grad_rows, lr, beta1, beta2, eps, wd, step_size, bias_correction2_sqrt,
                    )  # fmt: skip
                else:
                    self._torch_rows_step(
                        p,
                        state,
                        rows,
                        grad_rows,
                        beta1,
                        beta2,
                        eps,
                        lr * wd,
                        step_size,
                        bias_correction2_sqrt,
                    )
        return loss

    @staticmethod
    def _torch_rows_step(
        p: torch.Tensor,
        state: dict[str, Any],
        rows: torch.Tensor,
        grad_rows: torch.Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        lr_wd: float,
        step_size: float,
        bias_correction2_sqrt: float,
    ) -> None:
        # Gather touched rows, update in fp32, scatter back: temporaries are (U, D) only.
        shape = (p.shape[0], -1)
        exp_avg, exp_avg_sq, p2d = (t.view(shape) for t in (state["exp_avg"], state["exp_avg_sq"], p))
        g = grad_rows.reshape(rows.numel(), -1).float()
        m = exp_avg.index_select(0, rows).float().mul_(beta1).add_(g, alpha=1 - beta1)
        v = exp_avg_sq.index_select(0, rows).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        w = p2d.index_select(0, rows).float().mul_(1 - lr_wd)
        w.addcdiv_(m, v.sqrt().div_(bias_correction2_sqrt).add_(eps), value=-step_size)
        exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
        exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
        p2d.index_copy_(0, rows, w.to(p.dtype))
