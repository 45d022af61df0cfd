"""Per-rank checks for tests/launch/test_memory_parallel.py, run under torchrun (gloo, CPU):

    torchrun --nproc_per_node=W -m tests.launch.memory_parallel_worker CHECK P

CHECK is `init P T DATA` (meta build, layout, local-shard init == slices of the 1-process init),
`lookup` (sharded read == full-table lookup: forward, weight grads, value grads assembled
from shards, averaged like data parallel across replicas; shard storage exactly 1/P; grad norm counts
each element once; under torch.compile equal to eager) or `errors` (bad setups raise clear errors). Any failed assertion exits non-zero.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from memlayers import MemoryPool, lookup
from memlayers.shard_layout import MemoryShardLayout
from memlayers.sharded import ShardedMemoryPool, gather_columns, sharded_lookup

N_KEYS, DV, K = 6, 12, 5


def global_batch(world: int, dtype=torch.float64):
    """The same data on every rank: the table and each rank's tokens (rank r gets 3 + r tokens, so the
    counts differ and the padding path runs)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(N_KEYS * N_KEYS, DV, generator=g, dtype=dtype)
    per_rank = []
    for r in range(world):
        t = 3 + r
        idx = torch.randint(0, N_KEYS * N_KEYS, (t, K), generator=g)
        w = torch.randn(t, K, generator=g, dtype=dtype).softmax(-1)
        gout = torch.randn(t, DV, generator=g, dtype=dtype)
        per_rank.append((idx, w, gout))
    return values, per_rank


def reference(values, per_rank, world: int):
    """Dense single-process math: out, weight grads per rank, and the DP-averaged value gradient
    (each rank's loss <out_r, gout_r>, averaged over ranks like DDP)."""
    v = values.clone().requires_grad_(True)
    outs, wgrads = [], []
    total = 0
    for idx, w, gout in per_rank:
        w = w.clone().requires_grad_(True)
        out = torch.einsum("tk,tkd->td", w, v[idx])  # naive gather, not the kernel under test
        total = total + (out * gout).sum() / world
        outs.append(out)
        wgrads.append(w)
    total.backward()
    return [o.detach() for o in outs], [w.grad * world for w in wgrads], v.grad


class Model(torch.nn.Module):
    """A pool registered at its owner plus a layer that keeps a plain reference, like the trainer's."""

    def __init__(self, values: torch.Tensor, sparse: bool):
        super().__init__()
        pool = MemoryPool(N_KEYS, DV, sparse_grad=sparse, lookup_impl="torch", dtype=values.dtype)
        with torch.no_grad():
            pool.values.copy_(values)
        self.memory_pools = torch.nn.ModuleList([pool])
        self.reader = torch.nn.Module()
        object.__setattr__(self.reader, "pool", pool)


def groups(P: int):
    """Memory groups: consecutive blocks of P ranks; replica groups: {r, r+P, ...} (as launch.parallelize)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world // P, P), mesh_dim_names=("replica", "memory"))
    assert dist.get_process_group_ranks(mesh.get_group("memory"))[0] == rank - rank % P
    return mesh.get_group("memory"), mesh.get_group("replica")


def check_lookup(P: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    memory_group, replica_group = groups(P)
    values, per_rank = global_batch(world)
    ref_out, ref_wgrad, ref_vgrad = reference(values, per_rank, world)
    idx, w, gout = per_rank[rank]
    for sparse in (False, True):
        model = Model(values, sparse)
        layout = MemoryShardLayout(model, memory_group, replica_group, world)
        pool = model.memory_pools[0]
        assert isinstance(pool, ShardedMemoryPool) and model.reader.pool is pool, (
            "pool references not rewired"
        )
        # Storage read off the tensor: exactly 1/P of the table per rank.
        assert pool.values.shape == (N_KEYS * N_KEYS, DV // P), pool.values.shape
        assert pool.values.untyped_storage().nbytes() == values.numel() * values.element_size() // P
        assert list(layout.regions()) == ["memory_pools.0.values"], layout.regions()
        assert layout.regions()["memory_pools.0.values"] == ((N_KEYS * N_KEYS, DV), (0, pool.columns.start))
        wl = w.clone().requires_grad_(True)
        out = pool.read(idx, wl)
        torch.testing.assert_close(out, ref_out[rank], rtol=1e-12, atol=1e-12)
        # Each rank backprops its own loss, as under DDP; the sync does the averaging.
        (out * gout).sum().backward()
        torch.testing.assert_close(wl.grad, ref_wgrad[rank], rtol=1e-12, atol=1e-12)
        layout.sync_grads()
        grad = pool.values.grad
        assert grad.is_sparse == sparse, (sparse, grad.layout)
        grad = grad.to_dense()
        full = gather_columns(grad, memory_group)
        torch.testing.assert_close(full, ref_vgrad, rtol=1e-10, atol=1e-12)
        # Every logical element counted once in the clipping norm, however many replicas exist.
        sq = layout.grad_sq_norm()
        torch.testing.assert_close(sq, ref_vgrad.pow(2).sum(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pool.full_values(), values)

    # Under torch.compile the sharded read is left out of the compiled region (its collectives run
    # eagerly between two graphs): the compiled read and its gradients equal the eager ones.
    model = Model(values, False)
    MemoryShardLayout(model, memory_group, replica_group, world)
    pool = model.memory_pools[0]

    def read(i, wt):
        return pool.read(i, wt * 1.5).tanh()

    torch._dynamo.reset()
    compiled = torch.compile(read, backend="aot_eager")
    w_e, w_c = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out_e, out_c = read(idx, w_e), compiled(idx, w_c)
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    (out_e * gout).sum().backward()
    grad_e = pool.values.grad.clone()
    pool.values.grad = None
    (out_c * gout).sum().backward()
    torch.testing.assert_close(w_c.grad, w_e.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool.values.grad, grad_e, rtol=1e-12, atol=1e-12)

    # The functional form agrees with the lookup kernel on the full table (fp32, the training dtype).
    group = memory_group
    cols = slice(dist.get_rank(group) * DV // P, (dist.get_rank(group) + 1) * DV // P)
    out = sharded_lookup(values.float()[:, cols].contiguous(), idx, w.float(), group, impl="torch")
    torch.testing.assert_close(
        out, lookup(values.float(), idx, w.float(), impl="torch"), rtol=1e-5, atol=1e-6
    )


def check_init(P: int, T: int = 1, data: str = "fsdp") -> None:
    """Meta build + layout + materialise: every rank's shards are exact slices of the 1-process init
    (bit for bit), for every tensor, and each rank allocated only its shards of the values."""
    from launch.config import load_config
    from launch.distributed.parallelize import build_layout, materialize, parallelize
    from launch.distributed.process_group import DistInfo
    from launch.models.build import build_model

    cfg = load_config(
        [
            "config=configs/memory/tiny_memory.yaml",
            f"parallel.memory={P}",
            f"parallel.tensor={T}",
            f"parallel.data={data}",
            "memory.v_dim=64",
            "model.n_heads=4",
            "model.n_kv_heads=2",
        ]  # fmt: skip
    )
    reference = build_model(cfg)
    reference.init_weights(seed=cfg.run.seed)
    info = DistInfo(rank=dist.get_rank(), world=dist.get_world_size())
    layout = build_layout(cfg, info)
    with torch.device("meta"):
        model = build_model(cfg)
    par = materialize(parallelize(model, layout, cfg), torch.device("cpu"), cfg.run.seed)
    values = par.memory.named_values()
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name in values:
            assert p.shape == (expected[name].shape[0], expected[name].shape[1] // P), (name, p.shape)
            full = par.memory.full_tensor(name, p.detach())
        elif hasattr(p, "full_tensor"):
            full = p.detach().full_tensor()
        else:
            full = p.detach()
        assert torch.equal(full, expected[name].detach()), f"{name}: shards differ from the 1-process init"
    assert model.output.weight is model.tok_embeddings.weight, "tied embeddings untied"


def check_errors(P: int) -> None:
    memory_group, _ = groups(P)
    pool = MemoryPool(N_KEYS, DV + 1)
    try:
        ShardedMemoryPool.from_pool(pool, memory_group)
    except ValueError as e:
        assert f"v_dim={DV + 1}" in str(e) and "parallel.memory" in str(e), e
    else:
        raise AssertionError("Dv not divisible by P was accepted")


if __name__ == "__main__":
    check, P, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        {"lookup": check_lookup, "errors": check_errors, "init": check_init}[check](
            P, *[int(e) if e.isdigit() else e for e in extra]
        )
        dist.barrier()
        print(f"rank {dist.get_rank()}: {check} P={P} ok", flush=True)
    finally:
        dist.destroy_process_group()
