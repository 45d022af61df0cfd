"""Training throughput (tokens/s) and peak memory of the model presets.

    python benchmarks/train_throughput.py [--steps 5] [--warmup 2] [--device cpu] [--out DIR]

Random tokens, full optimizer steps (forward, backward, AdamW), one fresh process per model so
peak memory is its own. Writes benchmarks/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import time

from common import RESULTS, machine, md_table, measure_in_subprocess, results_dir, write_results

MODELS = {
    "tiny": ("configs/tiny.yaml", []),
    "20M": ("configs/quickstart.yaml", []),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=results_dir, default=RESULTS)
    args = ap.parse_args()
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
        + "\nCommand: `python benchmarks/train_throughput.py`\n"
    )
    write_results("train_throughput", {"machine": m, "device": args.device, "rows": rows}, md, args.out)


if __name__ == "__main__":
    main()
