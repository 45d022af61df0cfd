"""What moving the optimizer state of a value step's rows costs on this machine, next to our kernels.

    python -m benchmarks row_traffic [--rows 1048576] [--dim 256] [--bags 4096] [--slots 128] [--reps 12]

An exact Adam of a value table reads and writes each updated row's value, first and second moment. The
`floor` row of `memory_lookup.py` prices those bytes at copy bandwidth; this measures them directly: a
C++ loop (built here) that reads, trivially updates and writes (p, m, v) of

* the sorted unique rows one step of uniform reads touches (~40% of the table: the rows the fused
  backward + update and the catch-up walk, in the same order), and
* as many contiguous rows (the same bytes as one stream),

alternating rep by rep with the real kernels on the same rows: the catch-up of rows one step behind
(`lazy_adam_rows_`) and the fused backward + update (`bag_backward_adam_`, rows current, weight
gradients on). Writes benchmarks/results/row_traffic.{json,md}. It measures; it asserts nothing.
"""

from __future__ import annotations

import time

import torch
from torch.utils.cpp_extension import load_inline

from benchmarks.harness import (
    alternating_ms,
    machine,
    md_table,
    native_ops_or_exit,
    parser,
    record,
    write_record,
)
from memlayers.hugepages import empty_huge_like
from memlayers.native import _isa_flags
from memlayers.optim.adam_replay import replay_horizon, step_table

_RMW_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
// Read, update and write the fp32 (p, m, v) rows `rows` (all rows [0, n) when rows is empty), with the
// L2 prefetch of the state rows 8 ahead that the optimizer kernels use.
void rmw_rows(torch::Tensor P, torch::Tensor M, torch::Tensor V, torch::Tensor rows, int64_t n) {
  const int64_t D = P.size(1);
  float* p = P.data_ptr<float>();
  float* m = M.data_ptr<float>();
  float* v = V.data_ptr<float>();
  const bool all = rows.numel() == 0;
  const int64_t* R = all ? nullptr : rows.data_ptr<int64_t>();
  const int64_t U = all ? n : rows.numel();
  at::parallel_for(0, U, 64, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (u + 8 < u1) {
        const int64_t q = all ? u + 8 : R[u + 8];
        for (int64_t o = 0; o < D; o += 16) {
          __builtin_prefetch(p + q * D + o, 0, 1);
          __builtin_prefetch(m + q * D + o, 0, 1);
          __builtin_prefetch(v + q * D + o, 0, 1);
        }
      }
      const int64_t r = all ? u : R[u];
      float* __restrict__ pp = p + r * D;
      float* __restrict__ mm = m + r * D;
      float* __restrict__ vv = v + r * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const float a = pp[j], b = mm[j], c = vv[j];
        pp[j] = a * 0.999f + b;
        mm[j] = b * 0.9f + c;
        vv[j] = c * 0.99f;
      }
    }
  });
}
"""


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--bags", type=int, default=4096)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.bags, args.slots, args.reps = 4096, 40, 64, 16, 2
    ops = native_ops_or_exit("row_traffic.py")
    _, isa_flags = _isa_flags()
    rmw = load_inline(
        "memlayers_row_traffic", cpp_sources=_RMW_SRC, functions=["rmw_rows"],
        extra_cflags=["-O3", "-fopenmp", *isa_flags], extra_ldflags=["-fopenmp"],
    ).rmw_rows  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    n, d = args.rows, args.dim
    P, M, V = (
        empty_huge_like(src).copy_(src)
        for src in (torch.rand(n, d, generator=gen) * s for s in (0.02, 1e-3, 1e-6))
    )
    batches = [torch.randint(0, n, (args.bags, args.slots), generator=gen) for _ in range(4)]
    uniques = [b.unique() for b in batches]
    weights = torch.rand(args.bags, args.slots, generator=gen)
    grad_out = torch.randn(args.bags, d, generator=gen)
    steps = 4 * args.reps + 16
    hist = step_table(torch.full((steps + 1,), 1e-3, dtype=torch.float64), 0.9, 0.999, 0.0).contiguous()
    horizon = replay_horizon(0.9, 0.999)
    row_step = torch.zeros(n, dtype=torch.long)
    counter = {"step": 0, "batch": 0}
    empty = torch.empty(0, dtype=torch.long)

    def next_batch() -> int:
        counter["batch"] = (counter["batch"] + 1) % len(batches)
        return counter["batch"]

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def sorted_rows() -> float:
        rows = uniques[next_batch()]
        return timed(lambda: rmw(P, M, V, rows, 0))

    def contiguous_rows() -> float:
        count = uniques[next_batch()].numel()
        return timed(lambda: rmw(P, M, V, empty, count))

    def catch_up() -> float:  # the step's rows one step behind, caught up to the current step
        rows = uniques[next_batch()]
        counter["step"] += 1
        target = counter["step"]
        row_step[rows] = target - 1
        grads = P.new_empty(0, d)
        return timed(lambda: ops.lazy_adam_rows_(P, M, V, row_step, rows, grads, hist, target, 0.9, 0.999, 1e-8,
                                                 horizon, -1))  # fmt: skip

    def fused() -> float:  # the fused backward + update of current rows (weight gradients on)
        b = next_batch()
        counter["step"] += 1
        target = counter["step"]
        row_step.fill_(target - 1)
        return timed(lambda: ops.bag_backward_adam_(P, M, V, row_step, batches[b], weights, grad_out, True, hist,
                                                    target, 0.9, 0.999, 1e-8, horizon, -1))  # fmt: skip

    runs = {
        "state read-modify-write, contiguous rows": contiguous_rows,
        "state read-modify-write, the step's sorted unique rows": sorted_rows,
        "catch-up kernel, those rows one step behind": catch_up,
        "fused backward + update kernel, those rows": fused,
    }
    rows = alternating_ms(runs, args.reps)
    unique = sum(u.numel() for u in uniques) / len(uniques)
    gb = 6 * unique * d * 4 / 1e9
    for r in rows:
        r["gbps"] = gb / (r["ms"] / 1e3)
    m = machine()
    md = (
        "# Optimizer-state traffic of a value step against our kernels\n\n"
        f"Machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}. {n} x {d} fp32 table, value and both "
        f"moments on 2 MiB pages; {args.bags} x {args.slots} uniform reads per step, {unique:,.0f} unique rows "
        f"({unique / n:.0%} of the table); median of {args.reps} alternating reps after 2 warmup each. GB/s counts "
        f"the 6 row transfers (value, m, v read and written) of those rows, {gb:.2f} GB, on every row of the table "
        "(the kernels move more: the fused one also reads the bag gradients and sorts the reads by row, the "
        "catch-up reads each row's step).\n\n"
        + md_table(
            rows,
            [
                ("what", "{method}"),
                ("ms", "{ms:.1f}"),
                ("min ms", "{min_ms:.1f}"),
                ("GB/s of state traffic", "{gbps:.1f}"),
            ],
        )  # fmt: skip
        + f"\nCommand: `python -m benchmarks row_traffic --rows {n} --dim {d} --bags {args.bags} --slots {args.slots} "
        f"--reps {args.reps}`\n"
    )
    write_record(record("row_traffic", args, rows, m, unique_rows=unique), md, args.out)


if __name__ == "__main__":
    main()
