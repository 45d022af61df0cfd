"""Naive reference implementations, written for obviousness, not speed (tests compare against these).

- ``reference_lookup``: a loop-gather weighted bag sum.
- ``reference_memory_forward``: product-key memory with explicit loops over heads, the FULL N x N
  score matrix and a brute-force top-K over all N*N slots (no product-key shortcut).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memlayers.memory import ProductKeyMemory


def reference_lookup(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """out[b] = sum_k weights[b, k] * values[indices[b, k]], one row at a time (autograd-friendly)."""
    B, K = indices.shape
    rows = []
    for b in range(B):
        acc = values.new_zeros(values.shape[1])
        for k in range(K):
            acc = acc + weights[b, k].to(values.dtype) * values[indices[b, k]]
        rows.append(acc)
    if not rows:
        return values.new_zeros(0, values.shape[1])
    return torch.stack(rows)


def _rms(t: Tensor, eps: float = 1e-6) -> Tensor:
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)


def reference_query_batchnorm(bn, q: Tensor) -> Tensor:
    """Per-feature batch norm of (T, F) queries written out: batch mean and biased variance in
    training, the running estimates in eval (the module's running estimates are not touched)."""
    if bn.training:
        mean = q.sum(0) / q.shape[0]
        var = ((q - mean) ** 2).sum(0) / q.shape[0]
    else:
        mean, var = bn.running_mean, bn.running_var
    return (q - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def reference_select(mem: ProductKeyMemory, x: Tensor) -> tuple[Tensor, Tensor]:
    """Brute force slot selection for tokens x (T, d): (T, H*K) slots and (T, H*K) weights."""
    H, half, N, K = mem.heads, mem.k_dim // 2, mem.n_keys, mem.knn
    q = x @ mem.query.weight.t()
    if mem.query.bias is not None:
        q = q + mem.query.bias
    if mem.query_norm is not None:
        q = reference_query_batchnorm(mem.query_norm, q)
    q = q.view(x.shape[0], H, mem.k_dim)
    slots, weights = [], []
    for h in range(H):
        q1, q2 = q[:, h, :half], q[:, h, half:]
        k1, k2 = mem.keys[h, 0], mem.keys[h, 1]
        if mem.qk_norm:
            q1, q2, k1, k2 = _rms(q1), _rms(q2), _rms(k1), _rms(k2)
        # full[t, i, j] = q1 . k1[i] + q2 . k2[j]: the score of slot i*N + j
        full = (q1 @ k1.t()).unsqueeze(-1) + (q2 @ k2.t()).unsqueeze(-2)
        s, idx = full.reshape(x.shape[0], N * N).topk(K, dim=-1)
        slots.append(idx)
        weights.append(torch.softmax(s.double(), dim=-1).to(s.dtype))
    return torch.cat(slots, dim=1), torch.cat(weights, dim=1)


def reference_memory_forward(mem: ProductKeyMemory, x: Tensor) -> Tensor:
    """y for x (..., d), computed the slow way from ``mem``'s parameters and its pool's values."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, mem.dim)
    slots, weights = reference_select(mem, x2)
    read = reference_lookup(mem.pool.values, slots, weights)
    if mem.gate is not None:
        read = read * F.silu(F.linear(x2, mem.gate.weight, mem.gate.bias))
    y = F.linear(read, mem.out.weight, mem.out.bias)
    return y.reshape(*lead, mem.dim)
