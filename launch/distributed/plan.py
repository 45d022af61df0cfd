"""Plan a layout before renting the machines: `python -m launch.plan config=FILE world=W [key=value ...]`.

    python -m launch.plan config=configs/memory/7b_memory.yaml parallel.memory=8 parallel.data=fsdp world=64

Builds the model on the meta device (nothing is allocated) and prints, per rank, the bytes of
parameters, gradients and optimizer state by group (memory values, dense), and the memory layers'
communication bytes per step (the README formula). `out=FILE.json` also writes the numbers.

What it counts, all fp32 (the trainer keeps fp32 master weights; bf16 is autocast only):
- dense parameters: tensor-parallel weights (attention wq/wk/wv/wo, FFN w1/w2/w3) split T ways, then
  FSDP2 shards (dim 0, padded) over the W/T data-parallel ranks with `parallel.data=fsdp`, or a full
  copy per rank with ddp; their gradients have the same size; AdamW keeps two moments of each.
- memory values: N² × Dv/P per rank (column shards, replicated over the W/P memory groups); two Adam
  moments of the same size; gradients dense (AdamW) or row-sparse (row_sparse_adam: at most the rows
  the memory group's tokens read, P·T·heads·knn per layer, each Dv/P values plus an 8-byte index).
Not counted: activations (they depend on batch, sequence and checkpointing), FSDP2's transient
all-gathered block, the CUDA/CPU runtime. Compare with measured peaks in benchmarks/results/scale_memory.md.
"""

from __future__ import annotations

import math

import torch

from launch.config import Config
from launch.models.build import build_model
from launch.train.optim import param_groups

FP32 = 4
GIB = 1 << 30


def _tp_split_ids(model: torch.nn.Module) -> set[int]:
    """Parameters tensor parallelism splits: attention and FFN projections (launch.parallelize)."""
    from launch.models.llama import Attention, FeedForward

    ids = set()
    for m in model.modules():
        if isinstance(m, Attention):
            ids |= {id(m.wq.weight), id(m.wk.weight), id(m.wv.weight), id(m.wo.weight)}
        elif isinstance(m, FeedForward):
            ids |= {id(m.w1.weight), id(m.w2.weight), id(m.w3.weight)}
    return ids


def dense_local_numel(p: torch.nn.Parameter, tp_split: bool, T: int, dp: int, fsdp: bool) -> int:
    shape = list(p.shape)
    if tp_split and T > 1:
        shape[0 if shape[0] % T == 0 else -1] //= T
    if fsdp and dp > 1 and shape:
        shape[0] = math.ceil(shape[0] / dp)  # FSDP2 pads dim 0 to a multiple of the mesh size
    return math.prod(shape)


def memory_comm_bytes(cfg: Config, world: int) -> int:
    """Bytes per rank per step over all memory layers (README, "Bytes per rank, per step")."""
    m, P = cfg.memory, cfg.parallel.memory
    if not m.layers or world == 1:
        return 0
    n_slots, dv = m.n_keys * m.n_keys, m.v_dim or cfg.model.dim
    b = 2 if cfg.train.dtype == "bf16" else FP32
    tokens = cfg.data.batch_size * cfg.data.seq_len // (world // cfg.parallel.tensor)
    slots = m.heads * m.knn
    if P == 1:
        per_layer = 0
        replicated = (
            2 * (world - 1) / world * n_slots * dv * b
        )  # all-reduced dense value gradient, once per pool
        return int(replicated)
    per_layer = (
        8 * (P - 1)
        + (P - 1) * tokens * slots * 8
        + 2 * (P - 1) * tokens * dv * b / P
        + (P - 1) * tokens * slots * 4
    )
    R = world // P
    replicas = 2 * (R - 1) / R * n_slots * dv * b / P if R > 1 else 0
    return int(per_layer * len(m.layers) + replicas)


def plan(cfg: Config, world: int) -> dict:
    """Per-rank byte counts of the layout `cfg.parallel` on `world` ranks (nothing allocated)."""
    from launch.distributed.parallelize import check_layout

    check_layout(cfg, world)
    P, T = cfg.parallel.memory, cfg.parallel.tensor
    dp = world // T
    fsdp = cfg.parallel.data == "fsdp" and dp > 1
    with torch.device("meta"):
        model = build_model(cfg)
    groups = param_groups(model)
    tp = _tp_split_ids(model)
    dense_params = sum(
        dense_local_numel(p, id(p) in tp, T, dp, fsdp) for g in ("decay", "no_decay") for p in groups[g]
    )
    value_params = sum(p.numel() // P for p in groups["memory_values"])
    m = cfg.memory
    if m.value_optimizer == "row_sparse_adam" and groups["memory_values"]:
        dv = (m.v_dim or cfg.model.dim) // P
        tokens = cfg.data.batch_size * cfg.data.seq_len // dp
        rows = min(m.n_keys * m.n_keys, P * tokens * m.heads * m.knn * len(m.layers))
        value_grad_bytes = rows * (dv * FP32 + 8) * len(groups["memory_values"])
    else:
        value_grad_bytes = value_params * FP32
    per_rank = {
        "params": {"values": value_params * FP32, "dense": dense_params * FP32},
        "grads": {"values": value_grad_bytes, "dense": dense_params * FP32},
        "optimizer": {"values": 2 * value_params * FP32, "dense": 2 * dense_params * FP32},
    }
    total = sum(v for row in per_rank.values() for v in row.values())
    return {
        "world": world,
        "layout": {
            "memory": P,
            "tensor": T,
            "data": cfg.parallel.data,
            "dp": dp,
            "replica_groups": world // P,
        },
        "logical_params": {
            "values": sum(p.numel() for p in groups["memory_values"]),
            "dense": sum(p.numel() for g in ("decay", "no_decay") for p in groups[g]),
        },
        "per_rank_bytes": per_rank,
        "per_rank_total_bytes": total,
        "memory_comm_bytes_per_step": memory_comm_bytes(cfg, world),
    }


def _fmt(n: float) -> str:
    return f"{n / GIB:10.3f} GiB"


def render(result: dict) -> str:
    lay = result["layout"]
    lines = [
        f"world {result['world']}: parallel.memory={lay['memory']} parallel.tensor={lay['tensor']} "
        f"parallel.data={lay['data']} ({lay['dp']} data-parallel ranks, {lay['replica_groups']} memory groups)",
        f"logical parameters: values {result['logical_params']['values'] / 1e9:.3f}B, dense {result['logical_params']['dense'] / 1e9:.3f}B",
        f"{'per rank':<12}{'values':>14}{'dense':>14}{'total':>14}",
    ]
    for kind, row in result["per_rank_bytes"].items():
        lines.append(
            f"{kind:<12}{_fmt(row['values']):>14}{_fmt(row['dense']):>14}{_fmt(row['values'] + row['dense']):>14}"
        )
    lines.append(f"{'total':<12}{'':>14}{'':>14}{_fmt(result['per_rank_total_bytes']):>14}")
    lines.append(
        f"memory-layer communication per rank per step: {result['memory_comm_bytes_per_step'] / (1 << 20):.1f} MiB"
    )
    lines.append("(activations, FSDP's transient all-gathered block and the runtime are not included)")
    return "\n".join(lines)
