"""The training loss over the vocabulary: `F.cross_entropy` against `launch.train.loss.cross_entropy_rows`.

    python -m benchmarks cross_entropy [--tokens 2048] [--vocab 8192] [--reps 15]

Forward + backward from a fresh logits tensor (as the model's output is every step), fp32 and bf16
logits, the two methods alternating rep by rep so drift on a shared machine hits both alike. The default
shape is the 20M model's step (16 x 128 tokens, 8k vocabulary). Writes
cross_entropy.{json,md} under --out (default benchmarks/results/<machine>/). It measures; it asserts nothing.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import alternating_ms, machine, md_table, parser, record, write_record
from launch.train.loss import cross_entropy_rows


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.reps = 16, 40, 2
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    base = torch.randn(args.tokens, args.vocab, generator=gen)
    methods = {
        "F.cross_entropy(logits.float())": lambda x: F.cross_entropy(x.float(), targets),
        "cross_entropy_rows": lambda x: cross_entropy_rows(x, targets),
    }
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        src = base.to(dtype)

        def run(fn, src=src) -> float:
            logits = src.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(logits).backward()
            return (time.perf_counter() - t0) * 1e3

        timed = alternating_ms({name: functools.partial(run, fn) for name, fn in methods.items()}, args.reps)
        rows += [{"dtype": str(dtype).removeprefix("torch."), **r} for r in timed]
    m = machine()
    md = (
        "# Cross-entropy over the vocabulary: forward + backward\n\n"
        f"Machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; {args.tokens} tokens x "
        f"{args.vocab} vocabulary; median of {args.reps} alternating reps after 2 warmup each.\n\n"
        + md_table(
            rows,
            [
                ("logits", "{dtype}"),
                ("method", "{method}"),
                ("ms", "{ms:.1f}"),
                ("min ms", "{min_ms:.1f}"),
                ("vs F.cross_entropy", "{speedup:.2f}x"),
            ],
        )  # fmt: skip
        + f"\nCommand: `python -m benchmarks cross_entropy --tokens {args.tokens} --vocab {args.vocab} --reps {args.reps}`\n"
    )
    write_record(record("cross_entropy", args, rows, m), md, args.out)


if __name__ == "__main__":
    main()
