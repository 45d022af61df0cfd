"""Bytes a memory layer communicates per training step: values sharded by embedding dim (this repo's
memory parallelism) vs replicated values whose dense gradient is all-reduced.

Per step, per memory layer, per rank (ring collectives; a rank sends what it receives):

    T  tokens per rank        S = H*K slots read per token     Dv value width     P memory-parallel ranks
    b  bytes per value (4 fp32, 2 bf16)      slot ids travel as int32 (4 B), weights and their grads fp32

    sharded   =  8 (P-1)                         token-count exchange (int64 per rank)
              +  (P-1) T S (4 + 4)               forward all-gather of slot ids + weights
              +  (P-1) T Dv b / P                forward all-to-all of the (T, Dv) reads
              +  (P-1) T Dv b / P                backward all-to-all of their gradients
              +  (P-1) T S 4                     backward reduce-scatter of the weight gradients
              [+ 2 (R-1)/R N^2 Dv b / P          value-shard all-reduce across R = W/P replica groups]
    replicated = 2 (W-1)/W N^2 Dv b              ring all-reduce of the dense value gradient

The sharded cost scales with tokens (and, through the all-gather, with P), the replicated one with the
table (N^2 Dv): at paper scale (N^2 = 1M slots, Dv = 1024, 16k tokens per rank, 8 ranks) the all-reduce
moves ~7 GiB per rank per step, the sharded read ~280 MiB. The measured part runs both schemes at 2 ranks under gloo, counts the bytes every collective call
moves with the same ring accounting (so it checks the formula against the real calls: their number,
shapes, dtypes and padding), and times one forward+backward of the read.

    python -m benchmarks memory_comm            # spawns 2 ranks with torchrun; writes memory_comm.{json,md}
    python -m benchmarks memory_comm --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.harness import REPO, default_out, machine, parser, record, write_record

# ---------------------------------------------------------------------------------------------
# The formula


def sharded_bytes(
    T: int, S: int, Dv: int, P: int, b: int = 4, n_slots: int = 0, world: int | None = None
) -> dict:
    """Per-rank bytes per step of one sharded memory layer, term by term (see module docstring)."""
    world = world or P
    R = world // P
    terms = {
        "count_exchange": 8 * (P - 1),
        "fwd_allgather_ids_weights": (P - 1) * T * S * (4 + 4),
        "fwd_alltoall_reads": (P - 1) * T * Dv * b // P,
        "bwd_alltoall_grads": (P - 1) * T * Dv * b // P,
        "bwd_reducescatter_weight_grads": (P - 1) * T * S * 4,
        "replica_allreduce_value_grads": int(2 * (R - 1) / R * n_slots * Dv * b / P) if R > 1 else 0,
    }
    terms["total"] = sum(terms.values())
    return terms


def replicated_bytes(n_slots: int, Dv: int, W: int, b: int = 4) -> int:
    """Per-rank bytes of a ring all-reduce of the dense (N^2, Dv) value gradient."""
    return int(2 * (W - 1) / W * n_slots * Dv * b)


# ---------------------------------------------------------------------------------------------
# Measurement (runs inside torchrun)


class ByteCounter:
    """Wraps the collectives and adds each call's per-rank ring cost to a tally."""

    def __init__(self):
        self.bytes, self.calls = 0, 0

    def wrap(self, fn, cost):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            W = dist.get_world_size(group)
            self.bytes += cost(args, W)
            self.calls += 1
            return fn(*args, **kwargs)

        return counted


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(n_keys: int, Dv: int, T: int, S: int, reps: int) -> dict:
    import memlayers.sharded as sh
    from memlayers import lookup
    from memlayers.sharded import sharded_lookup

    rank, W = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(W)))
    n_slots = n_keys * n_keys
    torch.manual_seed(rank)
    full = torch.randn(n_slots, Dv) * Dv**-0.5
    cols = slice(rank * Dv // W, (rank + 1) * Dv // W)
    shard = full[:, cols].contiguous().requires_grad_(True)
    replica = full.clone().requires_grad_(True)
    idx = torch.randint(0, n_slots, (T, S))
    w = torch.randn(T, S).softmax(-1).requires_grad_(True)
    gout = torch.randn(T, Dv)

    counter = ByteCounter()
    originals = (sh._all_gather, sh._reduce_scatter, dist.all_to_all_single, dist.all_reduce)
    # all-gather: receives (W-1) inputs; reduce-scatter: (W-1) outputs; all-to-all: (W-1)/W of its
    # input; ring all-reduce: 2 (W-1)/W of its tensor.
    sh._all_gather = counter.wrap(sh._all_gather, lambda a, W: (W - 1) * _nbytes(a[1]))
    sh._reduce_scatter = counter.wrap(sh._reduce_scatter, lambda a, W: (W - 1) * _nbytes(a[0]))
    dist.all_to_all_single = counter.wrap(dist.all_to_all_single, lambda a, W: (W - 1) * _nbytes(a[1]) // W)
    dist.all_reduce = counter.wrap(dist.all_reduce, lambda a, W: int(2 * (W - 1) / W * _nbytes(a[0])))
    try:

        def sharded_step():
            shard.grad = None
            out = sharded_lookup(shard, idx, w, group, impl="torch")
            (out * gout).sum().backward()

        def replicated_step():
            replica.grad = None
            out = lookup(replica, idx, w, impl="torch")
            (out * gout).sum().backward()
            dist.all_reduce(replica.grad, group=group)

        rows = {}
        for name, step in (("sharded", sharded_step), ("replicated", replicated_step)):
            step()  # warmup
            counter.bytes = counter.calls = 0
            step()
            measured, calls = counter.bytes, counter.calls
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            rows[name] = {
                "bytes_measured": measured,
                "collective_calls": calls,
                "step_s": statistics.median(times),
            }
    finally:
        sh._all_gather, sh._reduce_scatter, dist.all_to_all_single, dist.all_reduce = originals
    rows["sharded"]["bytes_formula"] = sharded_bytes(T, S, Dv, W)["total"]
    rows["replicated"]["bytes_formula"] = replicated_bytes(n_slots, Dv, W)
    return {
        "world": W,
        "n_keys": n_keys,
        "n_slots": n_slots,
        "v_dim": Dv,
        "tokens_per_rank": T,
        "slots_per_token": S,
        **rows,
    }


def worker(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        results = [measure(n, dv, t, s, args.reps) for n, dv, t, s in _measured_shapes(args.quick)]
        if dist.get_rank() == 0:
            Path(args.worker_out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _measured_shapes(quick: bool) -> list[tuple[int, int, int, int]]:
    # (n_keys, Dv, tokens per rank, H*K): the tiny test model's layer, then a mid-size table
    if quick:
        return [(16, 64, 128, 8), (64, 128, 512, 32)]
    return [(16, 64, 128, 8), (128, 256, 2048, 64), (256, 512, 4096, 128)]


# Paper-scale rows (formula only): (label, N^2, Dv, tokens per rank, H*K, W=P)
PROJECTED = [
    ("1.3B + 1M-slot memory, 8 ranks", 1 << 20, 1024, 8 * 2048, 4 * 32, 8),
    ("1.3B + 1M-slot memory, 64 ranks", 1 << 20, 1024, 8 * 2048, 4 * 32, 64),
    ("7B + 16M-slot memory (bf16), 64 ranks", 1 << 24, 2048, 4 * 4096, 4 * 32, 64),
]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_out:
        worker(args)
        return
    out_dir = args.out or default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".memory_comm_worker.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "benchmarks.memory_comm",
           "--reps", str(args.reps), "--worker-out", str(tmp), *(["--quick"] if args.quick else [])]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    measured = json.loads(tmp.read_text())
    tmp.unlink()
    projected = []
    for label, n_slots, dv, t, s, w in PROJECTED:
        b = 2 if "bf16" in label else 4
        projected.append({"label": label, "n_slots": n_slots, "v_dim": dv, "tokens_per_rank": t, "slots_per_token": s,
                          "world": w, "bytes_per_value": b, "sharded": sharded_bytes(t, s, dv, w, b),
                          "replicated": replicated_bytes(n_slots, dv, w, b)})  # fmt: skip
    # rows: the measured table; `measured_2_ranks_gloo` keeps it under its earlier name.
    out = record(
        "memory_comm", args, measured, machine(), measured_2_ranks_gloo=measured, projected=projected
    )
    lines = [
        "# Memory-layer communication per step: sharded values vs replicated values",
        "",
        f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, torch {out['machine']['torch']}; "
        f"gloo, 2 ranks, 1 thread each; {out['date']}. Bytes are per rank per memory layer per step "
        "(ring accounting). Sharded: all-gather of slot ids (int32) + weights, all-to-all of reads, and in "
        "backward all-to-all of their grads + reduce-scatter of weight grads. Replicated: ring all-reduce of "
        "the dense value gradient.",
        "",
        "## Measured (counted at every collective call) vs formula, fp32",
        "",
        "| slots × Dv | tokens/rank × H·K | sharded bytes (measured / formula) | replicated bytes (measured / formula) "
        "| ratio | sharded step (s) | replicated step (s) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in measured:
        sh, rep = r["sharded"], r["replicated"]
        lines.append(
            f"| {r['n_slots']:,} × {r['v_dim']} | {r['tokens_per_rank']:,} × {r['slots_per_token']} "
            f"| {_fmt_bytes(sh['bytes_measured'])} / {_fmt_bytes(sh['bytes_formula'])} "
            f"| {_fmt_bytes(rep['bytes_measured'])} / {_fmt_bytes(rep['bytes_formula'])} "
            f"| {rep['bytes_measured'] / max(sh['bytes_measured'], 1):,.1f}× | {sh['step_s']:.4f} | {rep['step_s']:.4f} |"
        )
    lines += [
        "",
        "## Projected (formula), P = W: values never replicated",
        "",
        "| setting | slots × Dv | tokens/rank × H·K | sharded | replicated all-reduce | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for p in projected:
        lines.append(
            f"| {p['label']} | {p['n_slots']:,} × {p['v_dim']} | {p['tokens_per_rank']:,} × {p['slots_per_token']} "
            f"| {_fmt_bytes(p['sharded']['total'])} | {_fmt_bytes(p['replicated'])} "
            f"| {p['replicated'] / p['sharded']['total']:,.0f}× |"
        )
    lines += ["", f"Command: `python -m benchmarks memory_comm{' --quick' if args.quick else ''}`", ""]
    write_record(out, "\n".join(lines), out_dir)


if __name__ == "__main__":
    main()
