"""Per-rank check for tests/memlayers/test_query_norm.py, run under torchrun (gloo, CPU):

    torchrun --nproc_per_node=W -m tests.memlayers.query_batchnorm_worker

Each rank holds a different number of the batch's tokens. With the data-parallel group set, a
memory layer with query batchnorm must give, on every rank, the rows one process computes on the
whole batch, the same running estimates, and (after averaging like data parallel) the same
parameter gradients. Any failed assertion exits non-zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from memlayers import MemoryPool, ProductKeyMemory, set_query_norm_group

F64 = torch.float64


def make_layer() -> ProductKeyMemory:
    torch.manual_seed(0)
    pool = MemoryPool(8, 12, dtype=F64)
    mem = ProductKeyMemory(16, pool, heads=2, k_dim=8, knn=4, query_batchnorm=True, own_pool=True, dtype=F64)
    with torch.no_grad():  # a learned affine and a shared query offset, so every term is exercised
        mem.query_norm.weight.uniform_(0.5, 1.5)
        mem.query_norm.bias.normal_(0.0, 0.3)
        mem.query.bias.normal_(0.0, 3.0)
    return mem


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    counts = [5 + 3 * r for r in range(world)]  # unequal shares of the batch
    x = torch.randn(sum(counts), 16, generator=g, dtype=F64)
    gout = torch.randn(sum(counts), 16, generator=g, dtype=F64)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])

    # one process, the whole batch; loss = sum over tokens (each rank's share adds up to it)
    full = make_layer()
    y_full = full(x)
    (y_full * gout).sum().backward()

    local = make_layer()
    assert set_query_norm_group(local, dist.group.WORLD) == 1
    y = local(x[lo:hi])
    torch.testing.assert_close(y, y_full[lo:hi], rtol=1e-10, atol=1e-12)
    (y * gout[lo:hi]).sum().backward()
    for name, p in local.named_parameters():
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
        dist.all_reduce(grad)  # the batch's gradient is the sum of the ranks' local ones
        ref = dict(full.named_parameters())[name].grad
        ref = ref.to_dense() if ref.is_sparse else ref
        torch.testing.assert_close(
            grad, ref, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"rank {rank} {n}: {m}"
        )
    for buf in ("running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(local.query_norm, buf), getattr(full.query_norm, buf), rtol=1e-10, atol=1e-12
        )

    # eval: running estimates, no communication needed (a rank with no peers still agrees)
    local.eval(), full.eval()
    torch.testing.assert_close(local(x[lo:hi]), full(x)[lo:hi], rtol=1e-10, atol=1e-12)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
