"""Training throughput (tokens/s) and peak memory of the model presets.

    python -m benchmarks train_throughput [--steps 5] [--warmup 2] [--device cpu] [--out DIR]

Random tokens, full optimizer steps (forward, backward, AdamW), one fresh process per model so
peak memory is its own. Writes train_throughput.{json,md} under --out.
"""

from __future__ import annotations

import time

from benchmarks.harness import machine, md_table, measure_in_subprocess, parser, record, write_record

MODELS = {
    "tiny": ("configs/tiny.yaml", []),
    "20M": ("configs/quickstart_dense.yaml", []),
}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.warmup = "tiny", 1, 1
    rows = []
    for name in args.models.split(","):
        config, overrides = MODELS[name]
        r = measure_in_subprocess(config, overrides, args.steps, args.warmup, args.device)
        rows.append({"model": name, **r, "params_m": r["params"] / 1e6})
    m = machine()
    md = (
        f"# Training throughput\n\nMachine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}{', ' + m['gpu'] if 'gpu' in m else ''}; device {args.device}; "
        f"median of {args.steps} optimizer steps after {args.warmup} warmup; {time.strftime('%Y-%m-%d')}.\n\n"
        + md_table(
            rows,
            [
                ("model", "{model}"),
                ("params", "{params_m:.2f}M"),
                ("batch × seq", "{batch} × {seq_len}"),
                ("step (s)", "{step_s:.3f}"),
                ("tokens/s", "{tokens_per_s:,.0f}"),
                ("peak memory (MB)", "{peak_mem_mb:,.0f}"),
            ],
        )
        + "\nCommand: `python -m benchmarks train_throughput`\n"
    )
    write_record(record("train_throughput", args, rows, m, device=args.device), md, args.out)


if __name__ == "__main__":
    main()
