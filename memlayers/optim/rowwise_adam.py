"""FBGEMM's partial row-wise Adam (one second moment per row), made exact like RowSparseAdam."""

from __future__ import annotations

from typing import Any

import torch

from memlayers.optim.row_sparse_adam import RowSparseAdam

__all__ = ["RowwiseAdam"]


class RowwiseAdam(RowSparseAdam):
    """FBGEMM's partial row-wise Adam, made exact like RowSparseAdam: a full first moment but ONE
    second moment per row (the running mean over the row of g**2), so the optimizer state is one
    table plus a column instead of two tables.

        m = b1*m + (1-b1)*g;  v_row = b2*v_row + (1-b2)*mean_d(g_d**2)
        p = p*(1 - lr*wd) - lr/bc1 * m / (sqrt(v_row)/sqrt(bc2) + eps)

    Rows that are not read replay dense (every-row) partial row-wise Adam's zero-gradient steps on
    their next read, as in RowSparseAdam. `exp_avg_sq` is an fp32 (rows,) tensor whatever the
    table's dtype. The row kernel is C++ on CPU (the denominator is one scalar per row and step, so a
    catch-up costs a multiply-add per element), else vectorised torch ops.
    """

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            super()._state(p)
            state["exp_avg_sq"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        return state

    def fuses_backward(self, p: torch.Tensor) -> bool:
        return False  # no C++ kernel for the row-wise moment: the backward hands rows to fused_step

    _rowwise = True
    _native_kernel = "lazy_rowwise_adam_rows_"

    _KEEP_DTYPE = (*RowSparseAdam._KEEP_DTYPE, "exp_avg_sq")  # the row moment stays fp32
