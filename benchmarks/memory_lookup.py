"""Benchmark the memory-layer value lookup and the whole value step on CPU (and GPU if present).

Part 1, lookup forward+backward (grads for values AND weights):
    memlayers.lookup_cpu (C++; sparse and dense value grads; the pure-torch fallback),
    F.embedding_bag (sparse and dense grads), a naive gather, the Triton path when CUDA.
Part 2, value step = forward + backward + optimizer update of the value table:
    embedding_bag + dense AdamW (single-tensor, foreach, fused), embedding_bag sparse +
    SparseAdam, embedding_bag sparse + SGD, ours + RowSparseAdam, ours (dense grad) +
    fused AdamW, and FBGEMM's table-batched embedding with its fused CPU optimizers when
    fbgemm-gpu-cpu imports.

Everything runs side by side in one process: warmup, then the median (and min) of --reps.
Writes memory_lookup.json and .md under --out (default benchmarks/results/<machine>/). It measures; it asserts nothing.

    python -m benchmarks memory_lookup                   # full sizes (1M x 256, 1M x 1024)
    python -m benchmarks memory_lookup --quick --out /tmp/x
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import fmt_ms, machine, parser, record, write_record
from memlayers.hugepages import empty_huge_like
from memlayers.lookup import lookup
from memlayers.lookup_cpu import lookup_cpu
from memlayers.native import native_ops
from memlayers.optim import RowSparseAdam, RowwiseAdam

GB = 1 << 30


# --clock thread: one torch thread, timed by the CPU time of this thread (time.thread_time), so
# time spent descheduled on a loaded shared machine does not count. Memory stalls still do.
CLOCK = {"fn": time.perf_counter}


def timeit(fn: Callable[[], None], warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    clock = CLOCK["fn"]
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_all": times}


def make_inputs(rows: int, bags: int, slots: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, rows, (bags, slots), generator=gen)
    weights = torch.randn(bags, slots, generator=gen).softmax(-1)
    grad_out = torch.randn(bags, dim, generator=gen)
    return indices, weights, grad_out


# ----------------------------------------------------------------------------- part 1


def lookup_methods(device: str) -> dict[str, tuple[Callable, float]]:
    """name -> (fn(values, indices, weights), extra memory in units of the (B,K,D) gather)."""
    if device == "cuda":
        methods = {
            "embedding_bag (dense grad)": (
                lambda v, i, w: F.embedding_bag(i, v, mode="sum", per_sample_weights=w),
                0,
            ),
            "naive gather": (lambda v, i, w: (v[i] * w[..., None]).sum(1), 3),
        }
        try:
            from memlayers.lookup import lookup  # the core agent's dispatcher (Triton on CUDA)

            methods["memlayers.lookup (triton)"] = (lambda v, i, w: lookup(v, i, w), 0)
        except Exception as err:  # recorded, not fatal: the GPU path belongs to another module
            methods[f"memlayers.lookup unavailable: {type(err).__name__}"] = (None, 0)
        methods["memlayers.lookup (triton), bf16 table"] = (lambda v, i, w: lookup(_bf16_copy(v), i, w), 0)
        methods["FBGEMM TBE (fwd; bwd = fused Adam step)"] = (_fbgemm_cuda_fn(), 0)
        return methods
    return {
        "embedding_bag (sparse grad)": (
            lambda v, i, w: F.embedding_bag(i, v, mode="sum", per_sample_weights=w, sparse=True),
            1,
        ),
        "embedding_bag (dense grad)": (
            lambda v, i, w: F.embedding_bag(i, v, mode="sum", per_sample_weights=w),
            1,
        ),
        "naive gather (dense grad)": (lambda v, i, w: (v[i] * w[..., None]).sum(1), 4),
        "lookup_cpu C++ (sparse grad)": (
            lambda v, i, w: lookup_cpu(v, i, w, sparse_grad=True, impl="cpp"),
            0,
        ),
        "lookup_cpu C++ (dense grad)": (
            lambda v, i, w: lookup_cpu(v, i, w, sparse_grad=False, impl="cpp"),
            0,
        ),
        "lookup_cpu C++, bf16 table (sparse grad)": (
            lambda v, i, w: lookup_cpu(_bf16_copy(v), i, w, sparse_grad=True, impl="cpp"),
            0,
        ),
        "lookup_cpu torch fallback (sparse grad)": (
            lambda v, i, w: lookup_cpu(v, i, w, sparse_grad=True, impl="torch"),
            1,
        ),
    }


def table(src: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of `src` allocated as memlayers allocates value tables: advised onto 2 MiB pages on CPU
    (memlayers.hugepages; every method here reads the same kind of table; MEMLAYERS_NO_HUGE_PAGES=1
    measures 4 KiB pages instead)."""
    return empty_huge_like(src, dtype).copy_(src)


_BF16: dict[int, torch.Tensor] = {}


def _bf16_copy(v: torch.Tensor) -> torch.Tensor:
    """A bf16 leaf copy of the benchmark table, made once per table."""
    if id(v) not in _BF16:
        _BF16.clear()
        _BF16[id(v)] = table(v.detach(), torch.bfloat16).requires_grad_()
    return _BF16[id(v)]


def read_gbps(rec: dict, key: str = "forward") -> float:
    """Effective bandwidth of a forward: every read row once (B*K*D values) plus the (B, D) output."""
    item = 2 if "bf16" in rec["method"] else 4
    nbytes = rec["bags"] * rec["slots"] * rec["dim"] * item + rec["bags"] * rec["dim"] * 4
    return nbytes / (rec[key]["ms"] / 1e3) / 1e9


def _fbgemm_cuda_fn() -> Callable | None:
    """FBGEMM's table-batched embedding on CUDA with its fused Adam (None when fbgemm_gpu is missing).
    The TBE owns its table (same shape as ours, its own values): timings only."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception:
        return None
    cache: dict[tuple, object] = {}

    def fn(v, i, w):
        key = tuple(v.shape)
        if key not in cache:
            cache.clear()
            cache[key] = SplitTableBatchedEmbeddingBagsCodegen(
                [(v.shape[0], v.shape[1], EmbeddingLocation.DEVICE, ComputeDevice.CUDA)],
                optimizer=EmbOptimType.ADAM,
                pooling_mode=PoolingMode.SUM,
                learning_rate=1e-3,
            ).cuda()
        offsets = torch.arange(0, i.numel() + 1, i.shape[1], device=i.device, dtype=torch.int64)
        return cache[key](i.reshape(-1).long(), offsets, per_sample_weights=w.reshape(-1).float())

    return fn


def lookup_calls(fn, values, indices, w, grad_out, sync=lambda: None) -> tuple[Callable, Callable]:
    """One forward (no grad) and one forward + backward of lookup method `fn`, gradients reset each call."""

    def fwd():
        with torch.no_grad():
            fn(values, indices, w)
        sync()

    def fwd_bwd():
        values.grad = w.grad = None
        for copy in _BF16.values():  # the bf16 table's own gradient must not accumulate across reps
            copy.grad = None
        fn(values, indices, w).backward(grad_out)
        sync()

    return fwd, fwd_bwd


def bench_lookup(rows, dim, bags, slots, reps, warmup, max_gb, device) -> list[dict]:
    indices, weights, grad_out = make_inputs(rows, bags, slots, dim)
    indices, weights, grad_out = indices.to(device), weights.to(device), grad_out.to(device)
    values = table(torch.randn(rows, dim, device=device)).requires_grad_()
    w = weights.clone().requires_grad_()
    table_gb = rows * dim * 4 / GB
    gather_gb = bags * slots * dim * 4 / GB
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    for name, (fn, gathers) in lookup_methods(device).items():
        rec = {"rows": rows, "dim": dim, "bags": bags, "slots": slots, "method": name, "device": device}
        need = 2 * table_gb + gathers * gather_gb  # table + a dense grad + temporaries
        if fn is None:
            rec["skipped"] = name
        elif need > max_gb:
            rec["skipped"] = f"needs ~{need:.1f} GB > --max-gb {max_gb}"
        elif name.startswith("lookup_cpu C++") and native_ops() is None:
            rec["skipped"] = "C++ extension unavailable"
        else:
            fwd, fwd_bwd = lookup_calls(fn, values, indices, w, grad_out, sync)
            rec["forward"] = timeit(fwd, warmup, reps)
            rec["forward_gbps"] = read_gbps(rec)
            rec["forward_backward"] = timeit(fwd_bwd, warmup, reps)
            values.grad = w.grad = None
            _BF16.clear()
        results.append(rec)
        print(_fmt(rec), flush=True)
        gc.collect()
    return results


# ----------------------------------------------------------------------------- part 2


def value_step_cases() -> dict[str, dict]:
    """name -> how to build it: the lookup, whether grads are sparse, the optimizer, memory (x table)."""
    eb_dense = lambda v, i, w: F.embedding_bag(i, v, mode="sum", per_sample_weights=w)
    eb_sparse = lambda v, i, w: F.embedding_bag(i, v, mode="sum", per_sample_weights=w, sparse=True)
    # Through memlayers.lookup: reads catch RowSparseAdam's stale rows up first (part of the cost).
    ours_sparse = lambda v, i, w: lookup(v, i, w, sparse=True, impl="cpu")
    ours_dense = lambda v, i, w: lookup_cpu(v, i, w, sparse_grad=False)
    lr = 1e-3
    return {
        "embedding_bag + AdamW (single-tensor)": dict(
            fn=eb_dense, opt=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0, foreach=False), mem=6
        ),
        "embedding_bag + AdamW (foreach)": dict(
            fn=eb_dense, opt=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0, foreach=True), mem=7
        ),
        "embedding_bag + AdamW (fused)": dict(
            fn=eb_dense, opt=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0, fused=True), mem=5
        ),
        "embedding_bag sparse + SparseAdam": dict(
            fn=eb_sparse, opt=lambda p: torch.optim.SparseAdam(p, lr=lr), mem=6
        ),
        "embedding_bag sparse + SGD": dict(fn=eb_sparse, opt=lambda p: torch.optim.SGD(p, lr=lr), mem=3),
        "lookup_cpu (dense grad) + AdamW (fused)": dict(
            fn=ours_dense, opt=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0, fused=True), mem=5
        ),
        "lookup_cpu (sparse grad) + RowSparseAdam": dict(
            fn=ours_sparse, opt=lambda p: RowSparseAdam(p, lr=lr), mem=3.4
        ),
        "lookup_cpu + RowSparseAdam fused into the backward": dict(
            fn=ours_sparse, opt=lambda p: RowSparseAdam(p, lr=lr, fused=True), mem=3.4
        ),
        "lookup_cpu + RowwiseAdam fused into the backward": dict(
            fn=ours_sparse, opt=lambda p: RowwiseAdam(p, lr=lr, fused=True), mem=2.4
        ),
        "lookup_cpu, bf16 table + RowSparseAdam fused": dict(
            fn=ours_sparse, opt=lambda p: RowSparseAdam(p, lr=lr, fused=True), mem=1.7, dtype=torch.bfloat16
        ),
        "lookup_cpu, bf16 table + RowSparseAdam fused, stochastic rounding": dict(
            fn=ours_sparse,
            opt=lambda p: RowSparseAdam(p, lr=lr, fused=True, rounding="stochastic"),
            mem=1.7,
            dtype=torch.bfloat16,
        ),
    }


STOCK_ADAM = (
    "embedding_bag + AdamW (single-tensor)",
    "embedding_bag + AdamW (foreach)",
    "embedding_bag + AdamW (fused)",
    "embedding_bag sparse + SparseAdam",
)


# Distinct index batches the value step cycles through: every step reads fresh rows, as training does,
# so RowSparseAdam pays its catch-up of rows left behind by earlier steps (with one fixed batch every
# row would be current at every read and the catch-up would never run).
VALUE_STEP_BATCHES = 4


def value_step_batches(rows, bags, slots, dim):
    """(batches of slot ids, weights, grad_out): the value step's inputs."""
    indices, weights, grad_out = make_inputs(rows, bags, slots, dim, seed=1)
    gen = torch.Generator().manual_seed(2)
    batches = [indices] + [
        torch.randint(0, rows, (bags, slots), generator=gen) for _ in range(VALUE_STEP_BATCHES - 1)
    ]
    return batches, weights, grad_out


def make_value_step(case: dict, rows, dim, batches, weights, grad_out) -> Callable[[], None]:
    """One training step of a fresh table with `case`'s lookup and optimizer; each call reads the next batch."""
    values = torch.nn.Parameter(table(torch.randn(rows, dim) * 0.02, case.get("dtype", torch.float32)))
    w = weights.clone().requires_grad_()
    opt = case["opt"]([values])
    calls = itertools.count()

    def step(fn=case["fn"]):
        opt.zero_grad(set_to_none=True)
        w.grad = None
        fn(values, batches[next(calls) % len(batches)], w).backward(grad_out)
        opt.step()

    return step


def bench_value_step(rows, dim, bags, slots, reps, warmup, max_gb) -> list[dict]:
    batches, weights, grad_out = value_step_batches(rows, bags, slots, dim)
    indices = batches[0]
    table_gb = rows * dim * 4 / GB
    results = []
    for name, case in value_step_cases().items():
        rec = {"rows": rows, "dim": dim, "bags": bags, "slots": slots, "method": name}
        need = case["mem"] * table_gb
        if need > max_gb:
            rec["skipped"] = f"needs ~{need:.1f} GB > --max-gb {max_gb}"
        else:
            try:
                rec["value_step"] = timeit(
                    make_value_step(case, rows, dim, batches, weights, grad_out), warmup, reps
                )
            except Exception as err:  # e.g. a fused optimizer missing on this build
                rec["skipped"] = f"{type(err).__name__}: {err}"[:200]
        results.append(rec)
        print(_fmt(rec), flush=True)
        gc.collect()
    results += bench_fbgemm(rows, dim, bags, slots, reps, warmup, max_gb, indices, weights, grad_out)
    results.append(adam_traffic_floor(rows, dim, batches, reps, warmup, max_gb))
    print(_fmt(results[-1]), flush=True)
    return results


def paired_ms(stock: Callable[[], None], ours: Callable[[], None], reps: int, warmup: int) -> dict:
    """Time `stock` and `ours` alternately (which goes first alternates too); the speed-up is the median of
    the per-pair ratios stock/ours, so the machine's drift between reps hits both alike."""

    def timed(fn) -> float:
        t0 = CLOCK["fn"]()
        fn()
        return (CLOCK["fn"]() - t0) * 1e3

    for _ in range(warmup):
        stock(), ours()
    times: dict[str, list[float]] = {"stock": [], "ours": []}
    for i in range(reps):
        for name in ("stock", "ours") if i % 2 == 0 else ("ours", "stock"):
            times[name].append(timed(stock if name == "stock" else ours))
    ratios = sorted(a / b for a, b in zip(times["stock"], times["ours"]))
    return {
        # Unrounded: a --quick forward takes well under 0.05 ms on a fast CPU, which rounding to 0.1 ms
        # stored as 0.0 (issue 34). Rounding happens only where the Markdown is written.
        "stock_ms": statistics.median(times["stock"]),
        "ours_ms": statistics.median(times["ours"]),
        "speedup_median": statistics.median(ratios),
        "speedup_range": [ratios[0], ratios[-1]],
        "pairs": len(ratios),
    }


def _print_paired(rec: dict) -> None:
    print(
        f"{rec['rows']}x{rec['dim']} paired {rec['what']}: stock {fmt_ms(rec['stock_ms'])} ms, ours {fmt_ms(rec['ours_ms'])} ms, "
        f"speed-up {rec['speedup_median']:.2f}x (pairs {rec['speedup_range'][0]:.2f}-{rec['speedup_range'][1]:.2f})",
        flush=True,
    )


# The lookup's headline comparisons, paired: embedding_bag with a sparse gradient (the fastest stock
# backward; its forward is the dense-gradient one's) against our C++ kernels.
PAIRED_LOOKUP = ("embedding_bag (sparse grad)", "lookup_cpu C++ (sparse grad)")


def bench_lookup_paired(rows, dim, bags, slots, reps, warmup, max_gb) -> list[dict]:
    base = {"rows": rows, "dim": dim, "bags": bags, "slots": slots, "methods": list(PAIRED_LOOKUP)}
    if 3 * rows * dim * 4 / GB > max_gb or native_ops() is None:
        return [
            base | {"what": what, "skipped": "exceeds --max-gb or no C++ extension"}
            for what in ("forward", "forward + backward")
        ]
    indices, weights, grad_out = make_inputs(rows, bags, slots, dim)
    values = table(torch.randn(rows, dim)).requires_grad_()
    w = weights.clone().requires_grad_()
    methods = lookup_methods("cpu")
    stock, ours = (lookup_calls(methods[name][0], values, indices, w, grad_out) for name in PAIRED_LOOKUP)
    out = []
    for i, what in enumerate(("forward", "forward + backward")):
        rec = base | {"what": what} | paired_ms(stock[i], ours[i], reps, warmup)
        _print_paired(rec)
        out.append(rec)
    values.grad = w.grad = None
    return out


# The headline comparison of the value step, paired: stock's best (fused AdamW) against ours at equal
# quality (RowSparseAdam fused into the backward).
PAIRED_VALUE_STEP = ("embedding_bag + AdamW (fused)", "lookup_cpu + RowSparseAdam fused into the backward")


def bench_value_step_paired(rows, dim, bags, slots, reps, warmup, max_gb) -> dict:
    cases = value_step_cases()
    rec = {"rows": rows, "dim": dim, "bags": bags, "slots": slots, "methods": list(PAIRED_VALUE_STEP),
           "what": "value step"}  # fmt: skip
    need = sum(cases[name]["mem"] for name in PAIRED_VALUE_STEP) * rows * dim * 4 / GB
    if need > max_gb:
        rec["skipped"] = f"needs ~{need:.1f} GB > --max-gb {max_gb}"
        return rec
    batches, weights, grad_out = value_step_batches(rows, bags, slots, dim)
    stock, ours = (
        make_value_step(cases[name], rows, dim, batches, weights, grad_out) for name in PAIRED_VALUE_STEP
    )
    rec.update(paired_ms(stock, ours, reps, warmup))
    _print_paired(rec)
    return rec


def adam_traffic_floor(rows, dim, batches, reps, warmup, max_gb) -> dict:
    """What an exact Adam step cannot go below on this machine: every row updated in a step has its
    value, first and second moment read and written once (6 row transfers; the forward's reads of the
    rows come on top), timed at this machine's measured copy bandwidth. Reported as a row of the
    value-step table so the fused kernels' distance from it is visible."""
    rec = {"rows": rows, "dim": dim, "bags": batches[0].shape[0], "slots": batches[0].shape[1],
           "method": "floor: exact Adam state traffic at copy bandwidth (not a kernel)"}  # fmt: skip
    if 2 * rows * dim * 4 / GB > max_gb:
        rec["skipped"] = "exceeds --max-gb"
        return rec
    unique = statistics.mean(torch.unique(b).numel() for b in batches)
    src, dst = torch.randn(rows, dim), torch.empty(rows, dim)
    copy = timeit(lambda: dst.copy_(src), warmup, reps)
    bandwidth = 2 * src.numel() * 4 / (copy["ms_min"] / 1e3)  # bytes read + written per second
    traffic = 6 * unique * dim * 4
    ms = traffic / bandwidth * 1e3
    rec.update(unique_rows_per_step=round(unique), copy_gbps=bandwidth / GB,
               value_step={"ms": ms, "ms_min": ms, "ms_all": [ms]})  # fmt: skip
    return rec


def bench_fbgemm(rows, dim, bags, slots, reps, warmup, max_gb, indices, weights, grad_out) -> list[dict]:
    """FBGEMM table-batched embedding (the recommender industry's fused backward+update)."""
    base = {"rows": rows, "dim": dim, "bags": bags, "slots": slots}
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as err:
        return [
            {**base, "method": "FBGEMM TBE", "skipped": f"fbgemm_gpu not importable: {type(err).__name__}"}
        ]
    results = []
    flat, offsets = indices.reshape(-1), torch.arange(0, indices.numel() + 1, slots)
    psw = weights.reshape(-1)
    # CPU TBE supports no Adam ("Optimizer adam is not supported in CPU mode"): its
    # closest fused optimizers stand in.
    for optim in ("EXACT_ROWWISE_ADAGRAD", "EXACT_SGD", "ADAM"):
        rec = {**base, "method": f"FBGEMM TBE fused {optim}"}
        if 3 * rows * dim * 4 / GB > max_gb:
            rec["skipped"] = "exceeds --max-gb"
        else:
            try:
                tbe = SplitTableBatchedEmbeddingBagsCodegen(
                    [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                    optimizer=getattr(EmbOptimType, optim),
                    pooling_mode=PoolingMode.SUM,
                    learning_rate=1e-3,
                )

                def step(tbe=tbe):
                    tbe(flat, offsets, per_sample_weights=psw).backward(grad_out)

                rec["value_step"] = timeit(step, warmup, reps)
                del tbe
            except Exception as err:
                rec["skipped"] = f"{type(err).__name__}: {err}"[:160]
        results.append(rec)
        print(_fmt(rec), flush=True)
        gc.collect()
    return results


# ----------------------------------------------------------------------------- report


def _fmt(rec: dict) -> str:
    head = f"{rec['rows']}x{rec['dim']} {rec['method']:<45}"
    if "skipped" in rec:
        return f"{head} skipped: {rec['skipped']}"
    parts = [
        f"{k} {fmt_ms(rec[k]['ms'])} ms (min {fmt_ms(rec[k]['ms_min'])})"
        for k in ("forward", "forward_backward", "value_step")
        if k in rec
    ]
    return f"{head} " + " | ".join(parts)


def add_speedups(lookups: list[dict], steps: list[dict]) -> None:
    for rec in lookups:
        if "forward_backward" not in rec:
            continue
        for base in ("embedding_bag (sparse grad)", "embedding_bag (dense grad)"):
            ref = next(
                (
                    r
                    for r in lookups
                    if r["method"] == base and r["dim"] == rec["dim"] and "forward_backward" in r
                ),
                None,
            )
            if ref:
                key = "speedup_vs_" + ("eb_sparse" if "sparse" in base else "eb_dense")
                rec[key] = ref["forward_backward"]["ms"] / rec["forward_backward"]["ms"]
                # Forward (inference): embedding_bag's forward is the same for both gradient kinds.
                rec["fwd_speedup_vs_eb"] = ref["forward"]["ms"] / rec["forward"]["ms"]
    for rec in steps:
        if "value_step" not in rec:
            continue
        stock = [
            r["value_step"]["ms"]
            for r in steps
            if r["method"] in STOCK_ADAM and r["dim"] == rec["dim"] and "value_step" in r
        ]
        if stock:
            rec["speedup_vs_best_stock_adam"] = min(stock) / rec["value_step"]["ms"]


def _num(rec: dict, key: str, spec: str) -> str:
    """`rec[key]` rounded for the table, or '-' when the record has no such value."""
    return format(rec[key], spec) if key in rec else "-"


def _md_rows(records: list[dict], n_cols: int, row: Callable[[dict, str], str]) -> list[str]:
    """One Markdown table row per record: `row(record, table)` when measured, else its skip reason
    (after the method, when the record has one) padded to `n_cols` cells."""
    lines = []
    for r in records:
        table = f"{r['rows']}x{r['dim']}"
        if "skipped" not in r:
            lines.append(row(r, table))
            continue
        cells = [table, *([r["method"]] if "method" in r else []), f"skipped: {r['skipped']}"]
        lines.append("| " + " | ".join(cells + [""] * (n_cols - len(cells))) + " |")
    return lines


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Memory lookup benchmark",
        "",
        f"Machine: {m['cpu_model']}, torch {m['torch']}, {m['num_threads']} threads"
        + (f", {m['cuda_device']}" if m.get("cuda_device") else "")
        + f". Load average at start {m.get('load_average_at_start', '?')} (other jobs may share the machine):"
        " compare rows within one run; `ms` is the median of the reps, `min` the fastest rep. "
        + (
            "Clock: CPU time of the one torch thread (`--clock thread`), so time descheduled by other jobs is excluded."
            if report["config"]["clock"] == "thread"
            else "Clock: wall time."
        ),
        f"Sizes: {report['config']['bags']} bags x {report['config']['slots']} slots, uniform random slots; "
        f"reps {report['config']['reps']} after {report['config']['warmup']} warmup. "
        f"C++ extension: {report['native']}. Tables (every method's) on "
        + (
            "2 MiB pages (memlayers.hugepages)."
            if m.get("huge_pages", False)
            else "4 KiB pages (MEMLAYERS_NO_HUGE_PAGES=1)."
        )
        + " Our optimizers' moments also use 2 MiB pages; torch's optimizers allocate theirs as usual.",
        "",
        "## Lookup forward + backward (grads for values and weights)",
        "",
        "| table | method | fwd ms | fwd GB/s | fwd vs embedding_bag | fwd+bwd ms (min) | vs embedding_bag sparse | vs embedding_bag dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += _md_rows(
        report["lookup"],
        8,
        lambda r, table: (
            f"| {table} | {r['method']} | {fmt_ms(r['forward']['ms'])} | {_num(r, 'forward_gbps', '.1f')} | "
            f"{_num(r, 'fwd_speedup_vs_eb', '.2f')}x | {fmt_ms(r['forward_backward']['ms'])} "
            f"({fmt_ms(r['forward_backward']['ms_min'])}) | "
            f"{_num(r, 'speedup_vs_eb_sparse', '.2f')}x | {_num(r, 'speedup_vs_eb_dense', '.2f')}x |"
        ),
    )
    lines += [
        "",
        "## Value step: forward + backward + optimizer update of the table",
        "",
        "| table | method | ms (min) | vs best stock Adam-family |",
        "|---|---|---|---|",
    ]
    lines += _md_rows(
        report["value_step"],
        4,
        lambda r, table: (
            f"| {table} | {r['method']} | {fmt_ms(r['value_step']['ms'])} ({fmt_ms(r['value_step']['ms_min'])}) | "
            f"{_num(r, 'speedup_vs_best_stock_adam', '.2f')}x |"
        ),
    )
    paired = report.get("lookup_paired", []) + report.get("value_step_paired", [])
    if paired:
        lines += [
            "",
            "## Paired",
            "",
            f"Stock and ours alternating in one process (which goes first alternates too); the speed-up is the median "
            f"of the per-pair ratios. Forward and forward + backward: `{PAIRED_LOOKUP[0]}` (its forward is the "
            f"dense-gradient one's) vs `{PAIRED_LOOKUP[1]}`; value step: `{PAIRED_VALUE_STEP[0]}` vs "
            f"`{PAIRED_VALUE_STEP[1]}`. The tables above time each method on its own, minutes apart.",
            "",
            "| table | what | stock ms | ours ms | speed-up, median of pairs | pairs (range) |",
            "|---|---|---|---|---|---|",
        ]
        lines += _md_rows(
            [r | {"method": r["what"]} for r in paired],
            6,
            lambda r, table: (
                f"| {table} | {r['what']} | {fmt_ms(r['stock_ms'])} | {fmt_ms(r['ours_ms'])} | {r['speedup_median']:.2f}x | "
                f"{r['pairs']} ({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) |"
            ),
        )
    lines += [
        "",
        "Best stock Adam-family = the fastest of embedding_bag + AdamW (single-tensor / foreach / fused) and "
        "embedding_bag sparse + SparseAdam at that size. RowSparseAdam computes dense AdamW's result (rows caught "
        "up on read; memlayers/optim/row_sparse_adam.py), so it is compared at equal training quality. Each step reads "
        f"a fresh batch of uniform random slots (cycling through {VALUE_STEP_BATCHES}), so rows left behind by "
        "earlier steps are caught up on read as in training; with uniform slots ~40% of the rows are updated every "
        "step, the regime where a row-sparse optimizer has least to skip. The `floor` row is arithmetic, not a "
        "kernel: 6 row transfers (value, exp_avg, exp_avg_sq read and written) per updated row at the measured "
        "copy bandwidth, the least any exact Adam of the table can move. RowwiseAdam is FBGEMM's "
        "partial row-wise Adam (one second moment per row), made exact the same way. FBGEMM's CPU TBE has no "
        "Adam, so its fused row-wise Adagrad and SGD are listed as peers. fwd GB/s counts each read row once.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=1 << 20, help="table rows (slots)")
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 1024], help="value widths to run")
    ap.add_argument("--bags", type=int, default=4096, help="bags (tokens) per batch")
    ap.add_argument("--slots", type=int, default=128, help="slots per bag (heads x knn)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--max-gb", type=float, default=14.0, help="skip cases whose estimated memory exceeds this"
    )
    ap.add_argument("--skip-value-step", action="store_true")
    ap.add_argument(
        "--paired-reps", type=int, default=12, help="pairs of each paired measurement (0: --reps)"
    )
    ap.add_argument(
        "--devices",
        nargs="+",
        choices=["cpu", "cuda"],
        default=["cpu", "cuda"],
        help="where to run the lookup cases (cuda only when available); the value step runs on cpu",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: wall-clock with all torch threads; thread: 1 thread, its CPU time (for loaded shared machines)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.dims, args.bags, args.slots, args.reps, args.warmup = 4096, [32], 64, 16, 2, 1

    if args.clock == "thread":
        torch.set_num_threads(1)
        CLOCK["fn"] = time.thread_time
    t0 = time.perf_counter()
    ops = native_ops()
    native = (
        f"built/loaded in {time.perf_counter() - t0:.1f} s"
        if ops is not None
        else "unavailable (torch fallback)"
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        # The harness's machine, plus the fields this benchmark recorded before it (its Markdown reads them).
        "machine": machine()
        | {
            "cpu_model": machine()["cpu"],
            "num_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "huge_pages": os.environ.get("MEMLAYERS_NO_HUGE_PAGES") != "1",
        },
        "config": config,
        "native": native,
        "lookup": [],
        "value_step": [],
        "lookup_paired": [],
        "value_step_paired": [],
    }
    devices = [d for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    for dim in args.dims:
        for device in devices:
            report["lookup"] += bench_lookup(
                args.rows, dim, args.bags, args.slots, args.reps, args.warmup, args.max_gb, device
            )
        if "cpu" in devices:
            report["lookup_paired"] += bench_lookup_paired(
                args.rows, dim, args.bags, args.slots, args.paired_reps or args.reps, args.warmup, args.max_gb
            )
            gc.collect()
        if not args.skip_value_step and "cpu" in devices:
            report["value_step"] += bench_value_step(
                args.rows, dim, args.bags, args.slots, args.reps, args.warmup, args.max_gb
            )
            gc.collect()
            report["value_step_paired"].append(
                bench_value_step_paired(
                    args.rows,
                    dim,
                    args.bags,
                    args.slots,
                    args.paired_reps or args.reps,
                    args.warmup,
                    args.max_gb,
                )
            )
    add_speedups(report["lookup"], report["value_step"])
    # rows: the headline (paired) comparisons; every table stays under its own name as well.
    md = markdown(report)
    rows = report["lookup_paired"] + report["value_step_paired"]
    rec = record("memory_lookup", config, rows, report.pop("machine"), **report)
    path = write_record(rec, md, args.out)
    print(f"wrote {path} and .md")
    return rec


if __name__ == "__main__":
    main()
