"""Row-sparse Adam for memory value tables that computes exactly what dense AdamW computes.

Dense AdamW (torch.optim.AdamW) moves EVERY row of a value table at every step: a row with a
zero gradient still decays its moments (m *= beta1, v *= beta2), keeps moving by its momentum
(lr_s / bc1_s * m / (sqrt(v) / sqrt(bc2_s) + eps)) and decays its weights (decoupled weight
decay). A "lazy" Adam that skips untouched rows learns measurably less (issue 15: recall 0.29 vs
0.64 on the fact corpus) because rarely-read rows lose those momentum updates.

This optimizer keeps dense AdamW's result while touching only the rows that are read:

* every row r carries `row_step[r]`, the optimizer step through which it is current, and the
  optimizer keeps `lr_history` (the learning rate of every step, so schedules replay exactly);
* a row is brought up to date (caught up) when it is READ — `memlayers.lookup` calls
  :func:`catch_up_before_read` with the slot ids before gathering — and when it gets a gradient.
  Catching up replays dense AdamW's zero-gradient steps for that row in its own registers:
  each skipped step s is m = b1*m; v = b2*v; p = p*(1 - lr_s*wd) - lr_s/bc1_s * m/(sqrt(v)/sqrt(bc2_s)+eps)
  (eps stays inside, so it is exact, not the eps-free closed form). After `horizon` replayed
  steps the per-step update has shrunk by (b1/sqrt(b2))**horizon below float resolution (see
  :func:`~memlayers.optim.adam_replay.replay_horizon`), and the rest of the gap is applied in closed form: m *= b1**n,
  v *= b2**n, p *= prod(1 - lr_s*wd) (a prefix sum of logs over the lr history). So the cost
  of a catch-up is at most `horizon` row-steps, paid only for rows that are read;
* the step for a row with a gradient is then AdamW's step with the global step count.

Why catch up on read (and not only at the next gradient): the forward pass must see the value
dense AdamW would have at that moment, or the gradients themselves would differ.

Equality: for fp32 parameters the values, `exp_avg` and `exp_avg_sq` after any sequence of
steps (random row subsets, changing learning rates, weight decay) equal torch.optim.AdamW's
(foreach=False) to ~1e-6 relative once the rows are caught up (tests/memlayers/test_row_sparse_adam.py).
Rows that nobody reads are stale in memory until :meth:`RowSparseAdam.flush` catches every row
up; `state_dict()` of a module holding the table calls it automatically when
:func:`flush_on_state_dict` registered the hook (launch/optim.py does), so checkpoints and
exports hold dense AdamW's values. The optimizer state also stores `row_step` and
`lr_history`, so a checkpoint taken without a flush still resumes exactly.

Gradients: sparse COO with one sparse dim (rows) from `lookup(..., sparse=True)` /
`F.embedding_bag(sparse=True)`, possibly uncoalesced (accumulated micro-batches), or dense
(rows whose gradient is all zero are treated as untouched: the replayed zero-gradient step is the
same math). Data-parallel replicas stay equal up to float rounding: each replica catches rows up
at its own reads, and the closed-form tail rounds differently when a gap is split.

bf16/fp16 tables: moments are stored in the parameter's dtype, the arithmetic is fp32, and a
catch-up keeps the row in fp32 registers across the replayed steps (one rounding per catch-up).
`rounding="stochastic"` rounds the bf16 stores of p, m and v stochastically (up with probability
equal to the dropped fraction): round-to-nearest loses every update below half a bf16 step, which
biases v upwards (b2*v + (1-b2)*g^2 moves only when g^2 is several times v) and drops late small
steps of p. The dither is a hash of the value's fp32 bits, the row, the step and the tensor, so
it is deterministic: resumes, column shards and the fused/unfused/catch-up paths round alike.

Fused update (`fused=True`): the CPU lookup's backward hands the value gradient to this optimizer instead
of autograd, so no (rows read x width) gradient tensor is written to `.grad` and read back. Either the
step runs inside the backward (`deferred=False`: exact when the table is read once per step and its
gradient is not clipped), or it waits for `step()` (`deferred=True`): the backward returns the weights'
gradient from a pass over the unique rows read that also sums the value gradient's squares without
writing it, and keeps only the lookup's inputs (slot ids, weights and the output gradient: tokens x
width, not rows x width); :meth:`RowSparseAdam.deferred_grad_sq_norm` gives that norm (for a global-norm
clip), :meth:`RowSparseAdam.scale_deferred_grad` takes the clip coefficient, and `step()` runs the fused
row update on the kept inputs, each summed row scaled. Rows read many times each (`rows_at_reads_per_row`)
are cheaper to keep summed than to sum again: then the backward keeps the gradient rows instead (few of
them) and `step()` is the unfused one. Several reads in one step (memory layers sharing the table,
gradient accumulation) are summed: their inputs are concatenated. The result is the unfused step on the
clipped gradient (bit-identical for one read per step; to float rounding otherwise, where the per-row
sums run in another order).

The row kernel is C++ (memlayers/csrc/lazy_adam.cpp; the fused backward+update in bag_backward.cpp) on
CPU when it builds, else vectorised torch ops over the touched rows (CUDA included; adam_replay.py).
The replay maths live in :mod:`memlayers.optim.adam_replay`, the registry of lazily updated tables in
:mod:`memlayers.optim.lazy_tables`, the bf16 rounding in :mod:`memlayers.optim.stochastic_rounding`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from memlayers.hugepages import empty_huge_like
from memlayers.native import native_ops
from memlayers.optim.adam_replay import adam_rows_torch, replay_horizon, step_table
from memlayers.optim.lazy_tables import register_tables

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


@dataclass
class _DeferredGrad:
    """A value gradient held back until `step()` (fused, deferred), as the parts of its backwards in
    order: a bag part (indices (B, K) int64, weights (B, K) fp32, grad_out (B, D) fp32) is a lookup to
    sum again at the step; a row part (unique rows, (U, D) row gradients) is summed already."""

    parts: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    scale: float = 1.0  # clip coefficient (scale_deferred_grad)
    sq_norm: torch.Tensor | None = None  # float64, of the whole unscaled gradient, once measured
    order: tuple[torch.Tensor, torch.Tensor] | None = None  # the stable sort of the one bag part's slot ids

    def bag_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every part as one lookup (bags concatenated, once), or None when there are row parts or the
        reads differ in width."""
        if not self.parts or any(len(part) != 3 for part in self.parts):
            return None
        if len({part[0].shape[1] for part in self.parts}) != 1:
            return None
        if len(self.parts) > 1:
            self.parts, self.order = [tuple(torch.cat(t) for t in zip(*self.parts))], None
        return self.parts[0]  # type: ignore[return-value]

    def coalesced(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique sorted rows, summed row gradients in p's dtype): the unfused gradient, unscaled, its
        parts summed in the order autograd would have accumulated them into `.grad`."""
        parts = [
            part if len(part) == 2 else native_ops().bag_backward(p.detach(), *part, True, False, False)[:2]
            for part in self.parts
        ]
        if len(parts) == 1:
            return parts[0]  # type: ignore[return-value]
        rows = torch.cat([r for r, _ in parts])
        grads = torch.cat([g.reshape(r.numel(), -1) for r, g in parts])
        shape = (p.shape[0], grads.shape[1])
        return _coalesced_rows(
            torch.sparse_coo_tensor(rows[None], grads, shape, check_invariants=False), p.shape[0]
        )


class RowSparseAdam(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) that touches only the rows read, with dense AdamW's result.

    See the module docstring for the math, the catch-up on read and `flush()`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        fused: bool = False,
        deferred: bool = False,
        rounding: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each lie in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if deferred and not fused:
            raise ValueError("deferred=True defers the fused update to step(): it needs fused=True")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        # fused: the lookup's backward hands each value gradient to this optimizer (no .grad): stepped
        # there (exact only when the table is read once per step and not clipped), or, deferred, kept
        # as the lookup's inputs until step() (see the module docstring).
        self.fused = fused
        self.deferred = deferred
        self._deferred: dict[int, _DeferredGrad] = {}
        # bf16 stores: < 0 rounds to nearest even, else stochastically with this seed (any dtype
        # other than bf16 ignores it).
        self.rounding_seed = (int(rounding_seed) & 0xFFFFFFFF) if rounding == "stochastic" else -1
        self._fused_since_step: set[int] = set()
        self._tables: dict[int, tuple[tuple, torch.Tensor]] = {}
        params = [p for group in self.param_groups for p in group["params"]]
        if any(p.dim() == 0 for p in params):
            raise ValueError("RowSparseAdam updates rows; got a 0-dim parameter")
        register_tables(self, params)

    # ------------------------------------------------------------------ state
    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            # table-sized moments: 2 MiB pages for their random row accesses (memlayers.hugepages)
            state["exp_avg"] = empty_huge_like(p).zero_()
            state["exp_avg_sq"] = empty_huge_like(p).zero_()
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
            state["lr_history"] = torch.zeros(1, dtype=torch.float64)
        return state

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def _table(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """The per-step scalar table, rebuilt once per step (O(steps) doubles)."""
        hist = state["lr_history"]
        key = (hist.numel(), *group["betas"], group["weight_decay"])
        cached = self._tables.get(id(p))
        if cached is None or cached[0] != key:
            table = step_table(hist, *group["betas"], group["weight_decay"]).contiguous()
            self._tables[id(p)] = cached = (key, table)
        return cached[1]

    # ------------------------------------------------------------------ row kernel
    # Partial row-wise Adam (RowwiseAdam) keeps one second moment per row; the C++ row kernel per variant.
    _rowwise = False
    _native_kernel = "lazy_adam_rows_"

    def _apply_rows(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        rows: torch.Tensor,
        grad_rows: torch.Tensor | None,
    ) -> None:
        """Catch the unique `rows` up to the current step (grad_rows None; rows already current are
        left as they are) or up to the step before it, then take the current step with `grad_rows`."""
        target = int(state["step"].item())
        table = self._table(p, state, group)
        beta1, beta2 = group["betas"]
        horizon = replay_horizon(beta1, beta2)
        p2d = p.detach().view(p.shape[0], -1)
        m2d = state["exp_avg"].view_as(p2d)
        v = state["exp_avg_sq"] if self._rowwise else state["exp_avg_sq"].view_as(p2d)
        row_step = state["row_step"]
        ops = native_ops()
        if ops is not None and p.device.type == "cpu":
            grads = grad_rows if grad_rows is not None else p2d.new_empty(0, p2d.shape[1])
            getattr(ops, self._native_kernel)(
                p2d, m2d, v, row_step, rows.contiguous(), grads, table, target, beta1, beta2, group["eps"], horizon,
                self.rounding_seed,
            )  # fmt: skip
            return
        adam_rows_torch(p2d, m2d, v.view(-1, 1) if self._rowwise else v, row_step, rows, grad_rows, table.to(p.device),
                        target, beta1, beta2, group["eps"], horizon, rowwise=self._rowwise,
                        rounding_seed=self.rounding_seed)  # fmt: skip

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every table's state now instead of at its first step: the moments are two tables the
        size of the values, faulted in (2 MiB pages) when allocated. launch.train does this when it
        builds the optimizer, so that cost is paid, and a table whose moments do not fit fails, before
        the first training step."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p)

    @torch.no_grad()
    def catch_up_rows(self, p: torch.Tensor, indices: torch.Tensor) -> None:
        """Bring rows `indices` (any shape, repeats fine) of `p` up to the current step."""
        state = self.state.get(p)
        if not state or not int(state["step"].item()):
            return  # no step taken yet: every row is current
        # Sorted unique rows: the row kernel then walks memory in order (measured 1.3x faster on 1M x 256:
        # 135 vs 180 ms, than claiming the raw, repeated reads one compare-and-swap at a time). On CPU a
        # bitmap over the table's rows gives them without sorting every index (~1 vs 6-7 ms for 524k).
        ops = native_ops()
        if ops is not None and p.device.type == "cpu" and indices.device.type == "cpu":
            rows = ops.unique_rows(indices.to(torch.int64), p.shape[0])
        else:
            rows = torch.unique(indices.reshape(-1).to(torch.int64))
        self._apply_rows(p, state, self._group_of(p), rows, None)

    @torch.no_grad()
    def flush(self) -> None:
        """Catch every row of every parameter up: memory then holds dense AdamW's values and moments.
        Call before reading the table other than through `lookup` (the state_dict hook does)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                stale = (state["row_step"] < int(state["step"].item())).nonzero().squeeze(1)
                if stale.numel():
                    self._apply_rows(p, state, group, stale, None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fused_since_step.clear()
        for group in self.param_groups:
            for p in group["params"]:
                deferred = self._deferred.pop(id(p), None)
                if deferred is not None:
                    if p.grad is not None:
                        raise RuntimeError(
                            "RowSparseAdam(deferred=True): the value table has both a deferred gradient (reads "
                            "through the C++ lookup) and a .grad (other reads); read it one way within a step"
                        )
                    self._step_deferred(p, group, deferred)
                    continue
                if p.grad is None:
                    continue  # fused mode: the backward already stepped this table
                if p.grad.is_sparse and p.dim() != 2:
                    raise ValueError(f"sparse gradients need a 2-D parameter, got shape {tuple(p.shape)}")
                rows, grad_rows = _coalesced_rows(p.grad, p.shape[0])
                self._step_rows(p, group, rows, grad_rows)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops deferred value gradients (fused, deferred mode) that no `step()` consumed."""
        self._deferred.clear()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def fused_step(self, p: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """One optimizer step of `p` from its coalesced gradient (unique rows, (U, D) row grads),
        called from the lookup's backward in fused mode: the same arithmetic as `step()`. Deferred:
        the rows are kept for `step()` instead."""
        if self.deferred:
            d = self._deferred_of(p)
            d.parts.append((rows, grad_rows))
            d.sq_norm = d.order = None
            return
        self._claim_fused(p)
        self._step_rows(p, self._group_of(p), rows, grad_rows)

    # ------------------------------------------------------------------ deferred fused update
    def has_deferred_grad(self, p: torch.Tensor) -> bool:
        """Whether `p` has a gradient held back for `step()` (deferred fused update)."""
        return id(p) in self._deferred

    # A backward (or the clip, for several reads) that reads the table's rows at least this many times
    # each on average keeps their summed gradient rows: writing U rows and reading them back at the step
    # then costs less than summing the reads again there (see `_measure_grad`). Measured at the
    # quickstart memory's reads (2,048 x 128, 1M x 512 fp32), one core: 129k unique rows (2 reads each)
    # 244 ms summed again vs 321 ms kept; 2.5k rows (104 reads each) 118 vs 76 ms; even near 5-6.
    rows_at_reads_per_row = 6.0

    @torch.no_grad()
    def deferred_grad_sq_norm(self, p: torch.Tensor) -> torch.Tensor:
        """Squared L2 norm (float64 scalar, CPU) of `p`'s deferred gradient: what `p.grad`'s would be
        unfused. Measured once per step, by the backward's own pass when the table was read once. After
        `scale_deferred_grad` it is the measured norm times the coefficient squared (in float64: the
        scaled gradient's rounding to p's dtype is not seen)."""
        d = self._deferred[id(p)]
        if d.sq_norm is None:
            bags = d.bag_inputs()
            if bags is not None:
                self._measure_grad(p, d, bags, need_weights_grad=False)
            else:
                d.sq_norm = self._materialize(p, d)[1].double().pow(2).sum().cpu()
        return d.sq_norm * (d.scale * d.scale) if d.scale != 1.0 else d.sq_norm

    def scale_deferred_grad(self, p: torch.Tensor, scale: float) -> None:
        """Multiply `p`'s deferred gradient by `scale` (a global-norm clip coefficient), as
        `p.grad.mul_(scale)` would: the step scales each summed row, rounded to p's dtype."""
        d = self._deferred[id(p)]
        if scale == 1.0:
            return
        if d.scale != 1.0:
            # A second coefficient: two roundings in p's dtype do not fold into one, so the first is
            # applied to the gradient held as rows (as the first `.grad.mul_` would have).
            rows, grad_rows = self._materialize(p, d)
            d.parts, d.sq_norm = [(rows, grad_rows.mul_(d.scale))], None
        d.scale = float(scale)

    def _measure_grad(
        self,
        p: torch.Tensor,
        d: _DeferredGrad,
        bags: tuple[torch.Tensor, ...],
        need_weights_grad: bool,
        copy: bool = False,
    ) -> torch.Tensor:
        """One C++ pass over the unique rows of the lookup `bags`, d's whole gradient: grad_weights when
        asked for, the value gradient's squared norm, and the sort. d keeps the summed rows when the rows
        are read often enough (`rows_at_reads_per_row`), else the lookup (its output gradient copied
        when `copy`: autograd's buffer) and the sort, for the step."""
        sq_norm, grad_w, sorted_rows, perm, rows, grad_rows = native_ops().bag_grad_sq_norm(
            p.detach(), *bags, need_weights_grad, self.rows_at_reads_per_row
        )
        if rows.numel():
            d.parts, d.order = [(rows, grad_rows)], None
        else:
            indices, weights, grad_out = bags
            d.parts, d.order = (
                [(indices, weights, grad_out.clone() if copy else grad_out)],
                (sorted_rows, perm),
            )
        d.sq_norm = sq_norm
        return grad_w

    def _materialize(self, p: torch.Tensor, d: _DeferredGrad) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn `d` into one coalesced row part (the unfused gradient, unscaled) and return it."""
        if not (len(d.parts) == 1 and len(d.parts[0]) == 2):
            d.parts, d.order = [d.coalesced(p)], None
        return d.parts[0]  # type: ignore[return-value]

    def _deferred_of(self, p: torch.Tensor) -> _DeferredGrad:
        d = self._deferred.get(id(p))
        if d is None:
            d = self._deferred[id(p)] = _DeferredGrad()
        return d

    def _step_deferred(self, p: torch.Tensor, group: dict[str, Any], d: _DeferredGrad) -> None:
        bags = d.bag_inputs()
        if bags is None:  # summed rows: the unfused step on them
            rows, grad_rows = self._materialize(p, d)
            if d.scale != 1.0:
                grad_rows = grad_rows.to(p.dtype).mul_(d.scale)
            self._step_rows(p, group, rows, grad_rows)
            return
        if not p.is_contiguous():
            raise ValueError("RowSparseAdam updates rows in place and needs contiguous parameters")
        state = self._state(p)
        self._advance(state, group["lr"])
        beta1, beta2 = group["betas"]
        native_ops().bag_backward_adam_(
            p.detach(), state["exp_avg"], state["exp_avg_sq"], state["row_step"], *bags, False,
            self._table(p, state, group), int(state["step"].item()), beta1, beta2, group["eps"],
            replay_horizon(beta1, beta2), self.rounding_seed, d.scale, *(d.order or (None, None)),
        )  # fmt: skip

    def fuses_backward(self, p: torch.Tensor) -> bool:
        """Whether `fused_backward` can run for `p`: the C++ kernel that applies the update inside the
        lookup's backward loop (CPU tables; otherwise the backward hands rows to `fused_step`)."""
        return p.device.type == "cpu" and p.dim() == 2 and native_ops() is not None

    @torch.no_grad()
    def fused_backward(
        self,
        p: torch.Tensor,
        indices: torch.Tensor,
        weights32: torch.Tensor,
        grad_out32: torch.Tensor,
        need_weights_grad: bool,
    ) -> torch.Tensor | None:
        """The lookup's backward and this optimizer's step of `p` in one pass over the unique rows read
        (FBGEMM's fused backward+update): each row's gradient is summed in registers and applied at once,
        so no gradient row is written or read back. Bit-identical to the lookup's sparse backward
        followed by `step()` (tests). Returns grad_weights (fp32, like `indices`) or None.

        Deferred: grad_weights now, from one pass over the unique rows read that also sums the value
        gradient's squared norm (what a global-norm clip needs next); the inputs (or, for rows read many
        times, their summed gradient rows), that norm and the pass's sort are kept for `step()`."""
        if not p.is_contiguous():
            raise ValueError("RowSparseAdam updates rows in place and needs contiguous parameters")
        if self.deferred:
            d = self._deferred_of(p)
            # grad_out may be autograd's own buffer: what is kept of it is a copy (tokens x width).
            if not d.parts:
                grad_w = self._measure_grad(
                    p, d, (indices, weights32, grad_out32), need_weights_grad, copy=True
                )
            else:
                # A further read of the table in this step: the norm of the sum is measured when asked for.
                grad_w = native_ops().bag_grad_sq_norm(
                    p.detach(), indices, weights32, grad_out32, need_weights_grad
                )[1]
                d.parts.append((indices, weights32, grad_out32.clone()))
                d.sq_norm = d.order = None
            return grad_w if need_weights_grad else None
        self._claim_fused(p)
        group = self._group_of(p)
        state = self._state(p)
        self._advance(state, group["lr"])
        beta1, beta2 = group["betas"]
        grad_w = native_ops().bag_backward_adam_(
            p.detach(), state["exp_avg"], state["exp_avg_sq"], state["row_step"], indices, weights32, grad_out32,
            need_weights_grad, self._table(p, state, group), int(state["step"].item()), beta1, beta2, group["eps"],
            replay_horizon(beta1, beta2), self.rounding_seed,
        )  # fmt: skip
        return grad_w if need_weights_grad else None

    def _claim_fused(self, p: torch.Tensor) -> None:
        """A second fused update before the next `step()` means the table is read more than once per
        step (several layers, gradient accumulation): the summed gradient would be needed, so refuse."""
        if id(p) in self._fused_since_step:
            raise RuntimeError(
                "RowSparseAdam(fused=True): the value table got two backward passes in one optimizer step "
                "(several memory layers on one pool, or gradient accumulation); the fused update is exact "
                "only for one read per step. Use deferred=True (the update then waits for step())."
            )
        self._fused_since_step.add(id(p))

    def _step_rows(
        self, p: torch.Tensor, group: dict[str, Any], rows: torch.Tensor, grad_rows: torch.Tensor
    ) -> None:
        if not p.is_contiguous():
            raise ValueError("RowSparseAdam updates rows in place and needs contiguous parameters")
        state = self._state(p)
        self._advance(state, group["lr"])
        if rows.numel() == 0:
            return
        grad_rows = grad_rows.to(p.dtype).reshape(rows.numel(), -1).contiguous()
        self._apply_rows(p, state, group, rows, grad_rows)

    @staticmethod
    def _advance(state: dict[str, Any], lr: float) -> None:
        state["step"] += 1
        hist = state["lr_history"]
        state["lr_history"] = torch.cat([hist, hist.new_tensor([float(lr)])])

    # State whose length grows with the step count (a checkpoint loader must take the saved length
    # instead of the live one).
    growing_state = ("lr_history",)

    # State that keeps its saved dtype on load (Optimizer.load_state_dict casts every state tensor
    # but `step` to the parameter's dtype).
    _KEEP_DTYPE = ("lr_history", "row_step")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        kept = {
            k: {key: v[key].clone() for key in self._KEEP_DTYPE if key in v}
            for k, v in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        self._tables.clear()
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in kept.get(i, {}).items():
                self.state[p][key] = value.to("cpu" if key == "lr_history" else p.device)
            for key in ("exp_avg", "exp_avg_sq"):  # loaded moments onto huge pages, one at a time
                value = self.state[p].get(key)
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.device.type == "cpu":
                    self.state[p][key] = empty_huge_like(value).copy_(value)
