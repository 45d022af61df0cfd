"""Huge-page advice for value tables and their optimizer state (memlayers.hugepages)."""

import sys
from pathlib import Path

import pytest
import torch

from memlayers import MemoryPool
from memlayers.hugepages import advise_huge_pages
from memlayers.optim import RowSparseAdam

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
thp_available = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages unavailable",
)


def anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@thp_available
def test_advised_memory_faults_in_as_huge_pages():
    before = anon_huge_kb()
    t = torch.empty(16 << 20)  # 64 MiB (above glibc's largest mmap threshold: fresh, untouched memory)
    assert advise_huge_pages(t)
    t.zero_()  # first touch
    assert anon_huge_kb() - before >= 48 << 10  # most of the 62+ aligned MiB came as 2 MiB pages
    del t


def test_advice_skips_what_it_cannot_help():
    assert not advise_huge_pages(torch.empty(1000))  # below two huge pages
    assert not advise_huge_pages(torch.empty(4 << 20)[:, None].expand(-1, 2))  # not contiguous
    assert not advise_huge_pages(torch.empty(8 << 20, device="meta"))


def test_opt_out(monkeypatch):
    monkeypatch.setenv("MEMLAYERS_NO_HUGE_PAGES", "1")
    assert not advise_huge_pages(torch.empty(8 << 20))


@thp_available
def test_table_and_moments_on_huge_pages_and_state_round_trip():
    before = anon_huge_kb()
    # 1M x 16 fp32 = 64 MiB each: above glibc's largest mmap threshold (32 MiB), so fresh memory, as
    # real tables (gigabytes) always are
    pool = MemoryPool(1024, 16)
    opt = RowSparseAdam([pool.values], lr=1e-2)
    rows = torch.arange(0, 1 << 20, 7)
    pool.values.grad = torch.sparse_coo_tensor(rows[None], torch.randn(rows.numel(), 16), (1 << 20, 16))
    opt.step()
    assert anon_huge_kb() - before >= 160 << 10  # table + two moments, 192 MiB, almost all huge
    fresh = RowSparseAdam([torch.nn.Parameter(pool.values.detach().clone())], lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    (p,) = fresh.param_groups[0]["params"]
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(fresh.state[p][key], opt.state[pool.values][key])
