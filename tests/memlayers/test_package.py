"""memlayers is a standalone library: importing it pulls in torch only."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_in_torch_only():
    code = (
        "import sys, memlayers\n"
        "from memlayers import MemoryPool, ProductKeyMemory, lookup\n"
        "bad = sorted(m for m in ('triton', 'launch', 'scalenet', 'memlayers.lookup_triton') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_three_line_snippet():
    import torch

    from memlayers import MemoryPool, ProductKeyMemory

    mem = ProductKeyMemory(
        dim=32, pool=MemoryPool(n_keys=16, v_dim=24), heads=2, k_dim=16, knn=4, own_pool=True
    )
    y = mem(torch.randn(2, 7, 32))
    assert y.shape == (2, 7, 32)
    y.sum().backward()
    assert mem.pool.values.grad is not None and mem.keys.grad is not None


def test_moved_modules_keep_their_old_import_paths():
    """launch/ and benchmarks/ import these paths; each is now a shim onto the module that moved."""
    from memlayers.layout import MemoryLayout
    from memlayers.lookup_cpu import lookup_cpu, native_available, native_ops
    from memlayers.optim import RowSparseAdam as MovedAdam
    from memlayers.query_batchnorm import QueryBatchNorm as MovedNorm
    from memlayers.query_norm import QueryBatchNorm, set_query_norm_group
    from memlayers.row_sparse_adam import RowSparseAdam, RowwiseAdam, flush_on_state_dict, has_lazy_tables
    from memlayers.shard_layout import MemoryShardLayout

    assert MemoryLayout is MemoryShardLayout and RowSparseAdam is MovedAdam and QueryBatchNorm is MovedNorm
    assert all(
        callable(f) for f in (lookup_cpu, native_available, native_ops, RowwiseAdam, flush_on_state_dict)
    )
    assert callable(has_lazy_tables) and callable(set_query_norm_group)
