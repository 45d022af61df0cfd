"""Memory model vs its dense baseline: training tokens/s and peak memory.

    python -m benchmarks memory_vs_dense [--n-keys 1024] [--steps 5] [--warmup 2] [--device cpu]

The 20M quickstart model, dense, against the same model with block 3's FFN replaced by a
product-key memory of n_keys² values (default 1M). Each step is the trainer's: forward, backward,
the global-norm clip (optim.grad_clip=1.0 over every gradient, the values' included), the optimizer
steps. `--optimizers` lists the memory rows: `default` = nothing but the memory shape set (what a user
gets: row_sparse_adam, its fused update deferred to the clipped step); `NAME` = memory.value_optimizer=NAME
with the other defaults; `NAME:unfused` = memory.fused_value_update=false (the value gradient written to
.grad, then clipped and stepped); `NAME:fused` = optim.grad_clip=0, so the update runs inside the lookup
backward; a third part (`NAME:fused:stochastic`) sets memory.value_rounding (bf16 stores).
`--value-dtype bf16` stores the table in bf16. One fresh process per row; each memory row's process also
builds the dense model and alternates steps with it (`measure_training_paired`), so the ratio is
measured under one machine state. Writes memory_vs_dense.{json,md} under --out
(`memory_vs_dense_bf16` for bf16 values).

Result files before 2026-12 ran no clipping in the measured step, and their plain `NAME` rows ran unfused.
"""

from __future__ import annotations

import time

from benchmarks.harness import machine, md_table, measure_in_subprocess, parser, record, write_record


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--n-keys", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--optimizers", default="default,adamw,row_sparse_adam:unfused,row_sparse_adam:fused,rowwise_adam"
    )
    ap.add_argument("--value-dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args(argv)
    base = "configs/quickstart_dense.yaml"
    if args.quick:  # the tiny model, a 16^2-value memory, one optimizer, one step
        base, args.n_keys, args.steps, args.warmup, args.optimizers = (
            "configs/tiny.yaml",
            16,
            1,
            1,
            "default",
        )
    mem = [
        f"memory.layers=[{1 if args.quick else 3}]",
        f"memory.n_keys={args.n_keys}",
        "memory.heads=4",
        f"memory.k_dim={16 if args.quick else 128}",
        f"memory.knn={4 if args.quick else 32}",
    ]
    mem.append(f"memory.value_dtype={args.value_dtype}")
    variants = []  # (spec, overrides), checked before anything is measured
    for spec in args.optimizers.split(","):
        opt, _, mode = spec.partition(":")
        mode, _, rounding = mode.partition(":")
        if mode not in ("", "fused", "unfused"):
            ap.error(f"--optimizers: {spec!r}: the mode after NAME: must be fused or unfused")
        extra = {"": [], "fused": ["optim.grad_clip=0"], "unfused": ["memory.fused_value_update=false"]}[mode]
        if opt != "default":
            extra.append(f"memory.value_optimizer={opt}")
        if rounding:
            extra.append(f"memory.value_rounding={rounding}")
        variants.append((spec, [*mem, *extra]))
    rows = [{"variant": "dense", **measure_in_subprocess(base, [], args.steps, args.warmup, args.device)}]
    for spec, overrides in variants:
        r = measure_in_subprocess(base, overrides, args.steps, args.warmup, args.device, paired_with=[])
        rows.append({"variant": f"memory {args.n_keys**2 / 1e6:.2f}M {args.value_dtype} values, {spec}", **r})
    dense_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["relative"] = r["tokens_per_s"] / dense_tps
        r["params_m"], r["active_m"] = r["params"] / 1e6, r["active_params"] / 1e6
        lo, hi = r.get("relative_paired_range", (1.0, 1.0))
        r["paired"] = f"{r.get('relative_paired', 1.0):.2f}× ({lo:.2f}–{hi:.2f})"
    m = machine()
    md = (
        f"# Memory model vs dense baseline\n\nMachine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch "
        f"threads, torch {m['torch']}{', ' + m['gpu'] if 'gpu' in m else ''}; device {args.device}; median of "
        f"{args.steps} optimizer steps after {args.warmup} warmup; {time.strftime('%Y-%m-%d')}.\n\n"
        + md_table(
            rows,
            [
                ("variant", "{variant}"),
                ("params", "{params_m:.1f}M"),
                ("active/token", "{active_m:.1f}M"),
                ("tokens/s", "{tokens_per_s:,.0f}"),
                ("vs dense, paired (range)", "{paired}"),
                ("vs dense, separate runs", "{relative:.2f}×"),
                ("peak memory (MB)", "{peak_mem_mb:,.0f}"),
            ],
        )
        + "\n`paired`: the memory model and the dense one in one process, steps alternating; the median over "
        "pairs of dense step time / memory step time (range: min–max pair). `separate runs`: tokens/s of the "
        "memory model's run over the dense row's run, measured one after the other; on a shared machine the "
        "load can drift between them.\n"
        + f"\nCommand: `python -m benchmarks memory_vs_dense --n-keys {args.n_keys} --value-dtype {args.value_dtype} "
        f"--steps {args.steps} --warmup {args.warmup} --optimizers {args.optimizers}`\n"
    )
    name = "memory_vs_dense" if args.value_dtype == "fp32" else f"memory_vs_dense_{args.value_dtype}"
    write_record(record(name, args, rows, m, device=args.device), md, args.out)


if __name__ == "__main__":
    main()
