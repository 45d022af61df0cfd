"""The memory layer's product-key search on CPU: our C++ kernel against the stock torch path.

    python -m benchmarks product_topk [--tokens 2048] [--heads 4] [--n-keys 1024] [--knn 32]

Per (token, head): each half's top-k of n_keys sub-key scores, then the top-k of the k*k sums.
Stock = two `torch.topk` over the halves plus the k*k candidate sums and their `torch.topk` (what
ProductKeyMemory runs without the kernel); ours = `memlayers::product_topk` (indices; same ids, same
order: tested). The default shape is the 20M memory model's (16 x 128 tokens, 4 heads, 1M values,
top-32). Also times `amax` over the same scores: reading them once, the least any search costs.
A second table times the whole search with its backward, from the queries and sub-keys (`--half`
= k_dim / 2) to their gradients: the portable route (`einsum` scores, the C++ top-k on a contiguous
copy, `gather`; autograd builds a dense score gradient) against `memlayers::product_key_topk_cpu`
(scores into a reused buffer, K-sparse backward), alternating reps.
Writes benchmarks/results/product_topk.{json,md}. It measures; it asserts nothing.
"""

from __future__ import annotations

import functools
import time

import torch

from benchmarks.harness import (
    alternating_ms,
    machine,
    md_table,
    native_ops_or_exit,
    parser,
    record,
    write_record,
)
from benchmarks.memory_lookup import timeit
from memlayers.key_search import product_key_topk_op, product_topk_op


def stock_search(scores: torch.Tensor, k: int) -> torch.Tensor:
    s, i = scores.topk(k, dim=-1)  # (..., 2, k) each half
    sums = (s[..., 0, :, None] + s[..., 1, None, :]).flatten(-2)  # (..., k*k)
    return sums.topk(k, dim=-1).indices


def einsum_route(q: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """What ProductKeyMemory.select ran before key_search: all scores by einsum, gathered with autograd."""
    scores = torch.einsum("thcd,hcnd->thcn", q, keys)
    top_i, _ = product_topk_op(scores.detach().contiguous(), k)
    return scores.gather(-1, top_i)


def search_with_backward(args) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    T, H, N, half, k = args.tokens, args.heads, args.n_keys, args.half, args.knn
    q = torch.randn(T, H, 2, half, generator=gen, requires_grad=True)
    keys = torch.randn(H, 2, N, half, generator=gen, requires_grad=True)
    grad = torch.randn(T, H, 2, k, generator=gen)
    routes = {
        "einsum + C++ top-k + gather, autograd (dense score gradient)": einsum_route,
        "ours: memlayers::product_key_topk_cpu (K-sparse backward)": lambda q, keys, k: product_key_topk_op(
            q, keys, k
        )[0],
    }

    def run(route) -> float:
        q.grad = keys.grad = None
        t0 = time.perf_counter()
        route(q, keys, k).backward(grad)
        return (time.perf_counter() - t0) * 1e3

    return alternating_ms({name: functools.partial(run, route) for name, route in routes.items()}, args.reps)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-keys", type=int, default=1024)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--half", type=int, default=64, help="half of k_dim (the 20M memory model: k_dim 128)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.heads, args.n_keys, args.knn, args.half, args.reps = 8, 2, 64, 8, 4, 2
    ops = native_ops_or_exit("product_topk.py")
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
    full = search_with_backward(args)
    shape = f"{args.tokens} tokens x {args.heads} heads, 2 x {args.n_keys} sub-keys, top-{k}"
    md = (
        "# Product-key search (CPU)\n\n"
        f"Machine: {machine()['cpu']}, {machine()['torch_threads']} threads; {shape}; median of {args.reps} after 2 warmup.\n\n"
        + md_table(rows, [("method", "{method}"), ("ms", "{ms:.1f}"), ("vs torch", "{speedup:.2f}x")])
        + f"\n## Search forward + backward (scores from queries and sub-keys, half-dim {args.half}, to their gradients)\n\n"
        + md_table(
            full,
            [
                ("route", "{method}"),
                ("ms", "{ms:.1f}"),
                ("min ms", "{min_ms:.1f}"),
                ("vs einsum route", "{speedup:.2f}x"),
            ],
        )
        + "\nCommand: `python -m benchmarks product_topk "
        + f"--tokens {args.tokens} --heads {args.heads} --n-keys {args.n_keys} --knn {k} --half {args.half}`\n"
    )
    rec = record("product_topk", args, rows, with_backward=full)
    rec["shape"] = rec["args"]  # the name earlier records used for the arguments
    write_record(rec, md, args.out)


if __name__ == "__main__":
    main()
