"""Product-key memory layer (Lample et al. 2019; Memory+ of "Memory Layers at Scale", 2024).

For x in R^d, H heads, keys of dim k split in two halves of k/2, N sub-keys per half per head:

    q      = query(x) viewed as (H, k);  q1 = q[:k/2], q2 = q[k/2:]
    s1, s2 = q1 . keys[h, 0], q2 . keys[h, 1]              (N scores each)
    top-K of s1 and of s2 -> K*K candidates with score s1[i] + s2[j] and slot i*N + j
    top-K of the candidates -> K slots per head, w = softmax(scores) in fp32
    read   = sum_h sum_K w * values[slot]                  (one bag of H*K entries per token)
    y      = out(read * silu(gate(x)))  if gated  else  out(read)

Picking the top-K of each half first is exact: any slot in the full N*N top-K has both halves in
their half's top-K (otherwise K slots sharing a better half would beat it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlayers.key_search import product_key_topk_op
from memlayers.pool import MemoryPool
from memlayers.query_batchnorm import QueryBatchNorm

_QK_NORM_EPS = 1e-6


class ProductKeyMemory(nn.Module):
    """Product-key memory reading from a shared :class:`MemoryPool`.

    Args:
        dim:    model width d (input and output).
        pool:   the value table; shared by every layer given the same pool.
        heads:  H query heads.
        k_dim:  key dim k (even; each half k/2 scores against N sub-keys).
        knn:    K slots kept per head (K <= n_keys).
        gated:  Memory+ output ``out(read * silu(gate(x)))``; plain ``out(read)`` when False.
        qk_norm: RMS-normalise (no learnable scale) each half-query and each sub-key over its k/2 dims
            before scoring, so both halves' scores live on one scale.
        query_batchnorm: batch-normalise the query features over the batch's tokens (learned affine,
            running estimates in eval) before scoring, as Lample et al. 2019 do against slot collapse;
            see :mod:`memlayers.query_batchnorm` (``set_query_norm_group`` synchronises it across ranks).
        own_pool: register ``pool`` as this layer's submodule (``mem.pool.values`` then appears in
            ``mem.parameters()`` and ``mem.state_dict()``). Use it for a standalone layer. Default False:
            the layer keeps a plain reference and the pool's owner (e.g. ``model.memory_pool``) must
            register it once; see the note below.
        bias:   biases on query/gate/out (initialised to zero).

    Shapes: x (..., d) -> y (..., d), any leading dims.

    Parameters: ``query`` Linear(d, H*k), ``keys`` (H, 2, N, k/2), ``gate`` Linear(d, Dv) or None,
    ``out`` Linear(Dv, d). The values live in the pool.

    Why the pool is not a submodule by default: the table is usually shared by several layers, and a
    submodule registered under every layer would list the same tensor under one state_dict key per
    layer (safetensors refuses aliased storage; per-block FSDP would try to shard the values once per
    block, and the values must stay outside FSDP for the sharded read). Registering it once at the owner
    gives one key, one parameter and one ``.to()``/``.to_empty()``/``.half()`` move; the layers always
    reach the values through the pool object, never a cached tensor, so they see those moves.
    """

    def __init__(
        self,
        dim: int,
        pool: MemoryPool,
        heads: int = 4,
        k_dim: int = 256,
        knn: int = 32,
        gated: bool = True,
        qk_norm: bool = False,
        query_batchnorm: bool = False,
        *,
        own_pool: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _validate(dim, pool, heads, k_dim, knn)
        self.dim = dim
        self.heads = heads
        self.k_dim = k_dim
        self.knn = knn
        self.n_keys = pool.n_keys
        self.v_dim = pool.v_dim
        self.gated = gated
        self.qk_norm = qk_norm
        self.own_pool = own_pool
        if own_pool:
            self.pool = pool
        else:
            # Plain attribute, kept out of _modules on purpose (see the class docstring).
            object.__setattr__(self, "pool", pool)

        factory = {"device": device, "dtype": dtype}
        self.query = nn.Linear(dim, heads * k_dim, bias=bias, **factory)
        self.query_norm = QueryBatchNorm(heads * k_dim, **factory) if query_batchnorm else None
        self.keys = nn.Parameter(torch.empty(heads, 2, self.n_keys, k_dim // 2, **factory))
        self.gate = nn.Linear(dim, self.v_dim, bias=bias, **factory) if gated else None
        self.out = nn.Linear(self.v_dim, dim, bias=bias, **factory)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self, std: float | None = None) -> None:
        """(Re)initialise this layer's own parameters (not the pool's values: the pool's owner does).

        keys ~ U(-1/sqrt(k), 1/sqrt(k)); query/gate/out weights ~ N(0, std) with std defaulting to the
        fan-in scale in_features**-0.5 per linear; all biases zero. Safe after ``to_empty``.
        """
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.k_dim)
            nn.init.uniform_(self.keys, -bound, bound)
            for lin in (self.query, self.gate, self.out):
                if lin is None:
                    continue
                nn.init.normal_(lin.weight, mean=0.0, std=lin.in_features**-0.5 if std is None else std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()
        if self.own_pool:
            self.pool.reset_parameters()

    def init_weights(self, std: float | None = None) -> None:
        """torchtitan-style alias of :meth:`reset_parameters`."""
        self.reset_parameters(std)

    def init_spec(self) -> dict[str, tuple]:
        """What :meth:`reset_parameters` draws, per parameter name (see ``MemoryPool.init_spec``)."""
        bound = 1.0 / math.sqrt(self.k_dim)
        spec: dict[str, tuple] = {"keys": ("uniform", -bound, bound)}
        for name in ("query", "gate", "out"):
            lin = getattr(self, name)
            if lin is None:
                continue
            spec[f"{name}.weight"] = ("normal", 0.0, lin.in_features**-0.5)
            if lin.bias is not None:
                spec[f"{name}.bias"] = ("constant", 0.0)
        if self.query_norm is not None:
            spec.update({f"query_norm.{k}": v for k, v in self.query_norm.init_spec().items()})
        if self.own_pool:
            spec.update({f"pool.{k}": v for k, v in self.pool.init_spec().items()})
        return spec

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ProductKeyMemory: input last dim must be dim={self.dim}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.dim)
        indices, weights = self.select(x2)
        # fp32 for a bf16 table (fp32 accumulation); back to the activations' dtype for gate and out.
        read = self.pool.read(indices, weights).to(x.dtype)
        if self.gate is not None:
            read = read * F.silu(self.gate(x2))
        y = self.out(read)
        return y.reshape(*lead, self.dim)

    def select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Slots and weights for tokens x (T, d): returns (T, H*K) int64 slot ids and (T, H*K) weights
        (fp32, or fp64 for fp64 parameters).

        Heads are concatenated into one bag per token (head h owns columns h*K:(h+1)*K).
        """
        T = x.shape[0]
        H, half, N, K = self.heads, self.k_dim // 2, self.n_keys, self.knn
        q = self.query(x)
        # Scores, top-K and softmax in fp32 at least, whatever the autocast / parameter dtype (fp64 stays
        # fp64 so the reference tests can be tight).
        acc = torch.promote_types(self.keys.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = q.to(acc)
            if self.query_norm is not None:
                q = self.query_norm(q)
            q = q.view(T, H, 2, half)
            keys = self.keys.to(acc)
            if self.qk_norm:
                q = F.rms_norm(q, (half,), eps=_QK_NORM_EPS)
                keys = F.rms_norm(keys, (half,), eps=_QK_NORM_EPS)
            if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
                # C++ search (no K*K candidate tensor; ~1.5x faster than two torch.topk here) over scores
                # written into a reused buffer, with a K-sparse backward (memlayers/key_search.py); the
                # sums of the winners are formed by differentiable torch ops, in the same descending order.
                top_s, top_i, best_pos = product_key_topk_op(
                    q, keys.contiguous(), K
                )  # (T, H, 2, K) x2, (T, H, K)
                s1, s2 = top_s[:, :, 0], top_s[:, :, 1]
                best_s = s1.gather(-1, best_pos // K) + s2.gather(-1, best_pos % K)  # (T, H, K)
            else:
                # (T, H, 2, half) x (H, 2, N, half) -> (T, H, 2, N)
                scores = torch.einsum("thcd,hcnd->thcn", q, keys)
                top_s, top_i = scores.topk(K, dim=-1)  # (T, H, 2, K)
                s1, s2 = top_s[:, :, 0], top_s[:, :, 1]
                cand_s = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).view(T, H, K * K)
                best_s, best_pos = cand_s.topk(K, dim=-1)  # (T, H, K)
            i1, i2 = top_i[:, :, 0], top_i[:, :, 1]
            # Recover (i, j) of each winner from its flat position instead of building all K*K slot ids.
            slot = i1.gather(-1, best_pos // K) * N + i2.gather(-1, best_pos % K)
            weights = best_s.softmax(dim=-1)
        return slot.reshape(T, H * K), weights.reshape(T, H * K)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, k_dim={self.k_dim}, knn={self.knn}, n_keys={self.n_keys}, "
            f"v_dim={self.v_dim}, gated={self.gated}, qk_norm={self.qk_norm}, "
            f"query_batchnorm={self.query_norm is not None}, own_pool={self.own_pool}"
        )


def _validate(dim: int, pool: MemoryPool, heads: int, k_dim: int, knn: int) -> None:
    if not isinstance(pool, MemoryPool):
        raise TypeError(f"ProductKeyMemory: pool must be a MemoryPool, got {type(pool).__name__}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"ProductKeyMemory: dim must be a positive int, got {dim!r}")
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"ProductKeyMemory: heads must be >= 1, got {heads!r}")
    if not isinstance(k_dim, int) or k_dim < 2 or k_dim % 2:
        raise ValueError(f"ProductKeyMemory: k_dim must be a positive even int (two halves), got {k_dim!r}")
    if not isinstance(knn, int) or knn < 1:
        raise ValueError(f"ProductKeyMemory: knn must be >= 1, got {knn!r}")
    if knn > pool.n_keys:
        raise ValueError(
            f"ProductKeyMemory: knn={knn} exceeds pool.n_keys={pool.n_keys} (top-K per half needs K <= N)"
        )
