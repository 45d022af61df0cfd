"""Optimizers for memory value tables that touch only the rows read, with dense AdamW's result.

RowSparseAdam   row_sparse_adam.py      exact AdamW, rows caught up on read
RowwiseAdam     rowwise_adam.py         partial row-wise Adam (one second moment per row), exact
registry        lazy_tables.py          which tables are lazy and who owns them (the lookup asks)
replay maths    adam_replay.py          replay horizon, per-step scalar table, the torch row kernel
bf16 rounding   stochastic_rounding.py  the C++ kernels' stochastic rounding in torch ops
"""

from memlayers.optim.adam_replay import replay_horizon, step_table
from memlayers.optim.lazy_tables import (
    catch_up_before_read,
    deferred_grad_owner,
    flush_on_state_dict,
    fused_owner,
    has_lazy_tables,
)
from memlayers.optim.row_sparse_adam import RowSparseAdam
from memlayers.optim.rowwise_adam import RowwiseAdam
from memlayers.optim.stochastic_rounding import stochastic_bf16

__all__ = [
    "RowSparseAdam",
    "RowwiseAdam",
    "catch_up_before_read",
    "deferred_grad_owner",
    "flush_on_state_dict",
    "fused_owner",
    "has_lazy_tables",
    "replay_horizon",
    "step_table",
    "stochastic_bf16",
]
