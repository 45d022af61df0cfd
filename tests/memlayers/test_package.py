"""memlayers is a standalone library: importing it pulls in torch only."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_in_torch_only():
    code = (
        "import sys, memlayers\n"
        "from memlayers import MemoryPool, ProductKeyMemory, lookup\n"
        "bad = sorted(m for m in ('triton', 'launch', 'scalenet', 'memlayers.triton_lookup') if m in sys.modules)\n"
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
