"""Stochastic bf16 rounding of the row-sparse optimizers' stores, in torch ops.

The C++ row kernels' rounding (memlayers/csrc/row_math.h, stochastic_key / store_r) restated so the
torch path (CUDA tables, or no compiler) rounds bit for bit alike: uint32 arithmetic is emulated in
int64 with masks, and products are split in 16-bit halves so no int64 product overflows.
"""

from __future__ import annotations

import torch

__all__ = ["stochastic_bf16"]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stochastic_bf16(x: torch.Tensor, rows: torch.Tensor, step: int, which: int, seed: int) -> torch.Tensor:
    """fp32 (U, D) -> bf16, rounded up with probability equal to the dropped fraction; the dither is
    a hash of each value's bits and (row, step, which: 0 param / 1 exp_avg / 2 exp_avg_sq, seed)."""
    r = rows.to(torch.int64).view(-1, 1)
    k = _mix32((r & _M32) ^ _mix32(((r >> 32) + ((0x9E3779B9 * (which + 1)) & _M32)) & _M32))
    k = _mix32(k ^ (step & _M32))
    k = _mix32(k ^ (seed & _M32))
    xf = x.float().reshape(r.shape[0], -1).contiguous()
    u = xf.view(torch.int32).to(torch.int64) & _M32
    out = (u + (_mix32(u ^ k) & 0xFFFF)) >> 16
    out = torch.where(xf.isnan(), torch.full_like(out, 0x7FC0), out)
    return (out - (out >= 0x8000).to(torch.int64) * 0x10000).to(torch.int16).view(torch.bfloat16).view_as(x)
