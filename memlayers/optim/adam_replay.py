"""The replay maths of the row-sparse optimizers: how a row that skipped optimizer steps is caught up.

Dense AdamW moves every row at every step; a row with a zero gradient still decays its moments and
keeps moving by its momentum. A lazily updated row replays those zero-gradient steps when it is next
read or gets a gradient: one by one for `replay_horizon` steps, then in closed form (the remaining
updates are below float resolution). `step_table` holds the per-step scalars the replay needs, and
`adam_rows_torch` is the row kernel in vectorised torch ops (any device; the C++ kernels in
memlayers/csrc/lazy_adam.cpp and lazy_rowwise_adam.cpp compute the same on CPU).
"""

from __future__ import annotations

import math

import torch

from memlayers.optim.stochastic_rounding import stochastic_bf16

__all__ = ["adam_rows_torch", "replay_horizon", "step_table"]

# Catch-up tail tolerance: the updates dropped after `horizon` replayed steps sum to at most
# this fraction of the learning rate (see replay_horizon).
_TAIL_TOL = 1e-8


def replay_horizon(beta1: float, beta2: float) -> int:
    """Zero-gradient steps replayed one by one before the closed-form tail; -1 = all of them.

    After k zero-gradient steps |m|/sqrt(v) has shrunk by q**k, q = beta1/sqrt(beta2), and Adam's
    |m|/sqrt(v) <= (1-b1)/sqrt(1-b2)/sqrt(1-q**2); with bc1 >= 1-b1 the updates after step k sum to
    at most lr * q**k / (sqrt(1-b2) * sqrt(1-q**2) * (1-q)). Pick k so that is <= _TAIL_TOL * lr.
    When beta1**2 >= beta2 there is no such bound and every step is replayed.
    """
    if beta1 == 0.0:
        return 1
    q = beta1 / math.sqrt(beta2)
    if q >= 1.0:
        return -1
    scale = math.sqrt(1 - beta2) * math.sqrt(1 - q * q) * (1 - q)
    return max(1, math.ceil(math.log(_TAIL_TOL * scale) / math.log(q)))


def step_table(lr_history: torch.Tensor, beta1: float, beta2: float, weight_decay: float) -> torch.Tensor:
    """(steps+1, 4) float64: per step s, [lr_s/bc1_s, sqrt(bc2_s), 1 - lr_s*wd, sum_{j<=s} log(1 - lr_j*wd)].

    Row 0 (before any step) is [0, 1, 1, 0]. The scalars are the ones torch.optim.AdamW computes
    in Python doubles, so the kernels round them to float exactly as dense AdamW does.
    """
    s = torch.arange(lr_history.numel(), dtype=torch.float64)
    lr = lr_history.to(torch.float64)
    bc1 = 1 - beta1**s
    table = torch.empty(lr.numel(), 4, dtype=torch.float64)
    table[:, 0] = torch.where(s > 0, lr / bc1.clamp_min(1e-300), torch.zeros_like(lr))
    table[:, 1] = torch.where(s > 0, (1 - beta2**s).sqrt(), torch.ones_like(lr))
    table[:, 2] = 1 - lr * weight_decay
    table[:, 3] = torch.log(table[:, 2]).cumsum(0)
    return table


def adam_rows_torch(
    p2d: torch.Tensor,
    m2d: torch.Tensor,
    v2d: torch.Tensor,
    row_step: torch.Tensor,
    rows: torch.Tensor,
    grad_rows: torch.Tensor | None,
    table: torch.Tensor,
    target: int,
    beta1: float,
    beta2: float,
    eps: float,
    horizon: int,
    rowwise: bool = False,
    rounding_seed: int = -1,
) -> None:
    """The C++ kernel's math in vectorised torch ops over unique `rows` (any device).
    rowwise: v2d is (rows, 1), one second moment per row fed by the row's mean squared gradient."""
    upto = target - 1 if grad_rows is not None else target
    last = row_step.index_select(0, rows)
    if grad_rows is None:
        keep = last < upto
        rows, last = rows[keep], last[keep]
    if rows.numel() == 0:
        return
    gap = upto - last
    n_replay = gap if horizon < 0 else gap.clamp(max=horizon)
    p = p2d.index_select(0, rows).float()
    m = m2d.index_select(0, rows).float()
    v = v2d.index_select(0, rows).float()
    scalars = table.float()
    for k in range(1, int(n_replay.max()) + 1):
        active = (n_replay >= k).unsqueeze(1)
        h = scalars.index_select(0, (last + k).clamp(max=upto))
        ss, bc2s, dec = h[:, 0:1], h[:, 1:2], h[:, 2:3]
        md = m + (1 - beta1) * (0.0 - m)
        vd = v * beta2
        pd = p * dec + (-ss * md) / (vd.sqrt() / bc2s + eps)
        p, m, v = torch.where(active, pd, p), torch.where(active, md, m), torch.where(active, vd, v)
    rest = (gap - n_replay).to(torch.float64)
    if bool((rest > 0).any()):
        fd = torch.exp(table[upto, 3] - table.index_select(0, last + n_replay)[:, 3])
        m = m * (beta1**rest).float().unsqueeze(1)
        v = v * (beta2**rest).float().unsqueeze(1)
        p = p * fd.float().unsqueeze(1)
    if grad_rows is not None:
        g = grad_rows.float()
        ss, bc2s, dec = (float(x) for x in scalars[target, :3])
        m = m + (1 - beta1) * (g - m)
        g_sq = (g * g).mean(dim=1, keepdim=True) if rowwise else g * g
        v = v * beta2 + (1 - beta2) * g_sq
        p = p * dec + (-ss * m) / (v.sqrt() / bc2s + eps)
    for which, (dst, x) in enumerate(((p2d, p), (m2d, m), (v2d, v))):
        if dst.dtype == torch.bfloat16 and rounding_seed >= 0:
            dst.index_copy_(0, rows, stochastic_bf16(x, rows, target, which, rounding_seed))
        else:
            dst.index_copy_(0, rows, x.to(dst.dtype))
    row_step.index_fill_(0, rows, target)
