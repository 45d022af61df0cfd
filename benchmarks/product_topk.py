"""The memory layer's product-key search on CPU: our C++ kernel against the stock torch path.

    python benchmarks/product_topk.py [--tokens 2048] [--heads 4] [--n-keys 1024] [--knn 32]

Per (token, head): each half's top-k of n_keys sub-key scores, then the top-k of the k*k sums.
Stock = two `torch.topk` over the halves plus the k*k candidate sums and their `torch.topk` (what
ProductKeyMemory runs without the kernel); ours = `memlayers::product_topk` (indices; same ids, same
order: tested). The default shape is the 20M memory model's (16 x 128 tokens, 4 heads, 1M values,
top-32). Also times `amax` over the same scores: reading them once, the least any search costs.
Writes benchmarks/results/product_topk.{json,md}. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse

import torch
from common import RESULTS, machine, md_table, results_dir, write_results
from memory_lookup import timeit

from memlayers.lookup_cpu import native_ops


def stock_search(scores: torch.Tensor, k: int) -> torch.Tensor:
    s, i = scores.topk(k, dim=-1)  # (..., 2, k) each half
    sums = (s[..., 0, :, None] + s[..., 1, None, :]).flatten(-2)  # (..., k*k)
    return sums.topk(k, dim=-1).indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-keys", type=int, default=1024)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=results_dir, default=RESULTS)
    args = ap.parse_args()
    ops = native_ops()
    if ops is None:
        raise SystemExit("product_topk.py: the C++ extension did not build; nothing to compare")
    scores = torch.randn(args.tokens * args.heads, 2, args.n_keys, generator=torch.Generator().manual_seed(0))
    k = args.knn
    cases = {
        "torch: topk of each half + topk of the k*k sums": lambda: stock_search(scores, k),
        "ours: memlayers::product_topk": lambda: ops.product_topk(scores, k),
        "amax over the same scores (one read, not a search)": lambda: scores.amax(-1),
    }
    rows = [{"method": name, **timeit(fn, warmup=2, reps=args.reps)} for name, fn in cases.items()]
    stock = rows[0]["ms"]
    for r in rows:
        r["speedup"] = stock / r["ms"]
    shape = f"{args.tokens} tokens x {args.heads} heads, 2 x {args.n_keys} sub-keys, top-{k}"
    md = (
        "# Product-key search (CPU)\n\n"
        f"Machine: {machine()}; {shape}; median of {args.reps} after 2 warmup.\n\n"
        + md_table(rows, [("method", "{method}"), ("ms", "{ms:.1f}"), ("vs torch", "{speedup:.2f}x")])
        + "\nCommand: `python benchmarks/product_topk.py "
        + f"--tokens {args.tokens} --heads {args.heads} --n-keys {args.n_keys} --knn {k}`\n"
    )
    write_results("product_topk", {"machine": machine(), "shape": vars(args) | {"out": str(args.out)}, "rows": rows}, md, args.out)


if __name__ == "__main__":
    main()
