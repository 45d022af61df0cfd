"""The global gradient norm and clipping, over every kind of gradient the trainer produces: FSDP2
and tensor-parallel DTensors (per device mesh), plain dense tensors, row-sparse gradients, and the
memory value tables (whose shards' norms `memlayers.shard_layout.MemoryShardLayout` sums over its group,
counting a gradient that a row-sparse optimizer holds back for its fused step like a `.grad`)."""

from __future__ import annotations

import torch
from torch import nn

from memlayers.shard_layout import MemoryShardLayout


def _mesh_key(g: torch.Tensor):
    return id(g.device_mesh) if hasattr(g, "device_mesh") else None


@torch.no_grad()
def grad_norm_and_clip(
    params: list[nn.Parameter], max_norm: float, memory: MemoryShardLayout, clip_values: bool = True
) -> float:
    """L2 norm of all gradients, each logical element once; scales them to `max_norm` when above.
    `clip_values=False` leaves the memory value tables out of both the norm and the scaling (FBGEMM
    TBE's practice): their update then need not wait for the global norm, so it can run inside the
    lookup backward with clipping on (with them in, the fused update waits for the step and is scaled
    there through `memory.clip_`)."""
    values = {id(p) for p in memory.values()}
    grads = [p.grad for p in dict.fromkeys(params) if p.grad is not None and id(p) not in values]
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g for g in grads if g.is_sparse]
    norm_sq = memory.grad_sq_norm().double() if clip_values else torch.zeros((), dtype=torch.float64)
    # DTensors on different meshes (FSDP over "dp", tensor parallel over ("dp","tp") or "tp") and
    # plain tensors cannot share one foreach call: one norm per mesh, reduced to a plain number.
    by_mesh: dict = {}
    for g in dense:
        by_mesh.setdefault(_mesh_key(g), []).append(g)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm_sq = norm_sq + norm.double().cpu() ** 2
    for g in sparse:
        norm_sq = norm_sq + g.coalesce().values().double().pow(2).sum().cpu()
    total = float(norm_sq.sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(scale)
        if clip_values:
            memory.clip_(scale)
    return total
