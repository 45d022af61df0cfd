"""Moved: the row-sparse optimizers live in :mod:`memlayers.optim` (split by job: the optimizers,
the lazy-table registry, the replay maths, stochastic rounding). This module keeps the old import
path (launch/optim.py, benchmarks) working."""

from memlayers.optim import (
    RowSparseAdam,
    RowwiseAdam,
    catch_up_before_read,
    flush_on_state_dict,
    fused_owner,
    has_lazy_tables,
    replay_horizon,
    step_table,
    stochastic_bf16,
)

__all__ = [
    "RowSparseAdam",
    "RowwiseAdam",
    "catch_up_before_read",
    "flush_on_state_dict",
    "fused_owner",
    "has_lazy_tables",
    "replay_horizon",
    "step_table",
    "stochastic_bf16",
]
