"""Small blocks for the scalenet tests: Llama-named pre-norm residual blocks (dense and memory FFN) and a
plain user MLP block. Loaded by conftest.py (and by the FSDP worker script) under the module name
``scalenet_test_toys``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """Single-head causal attention; `rope` is a per-call scale on q and k so the test sees it arrive."""

    def __init__(self, dim: int):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        q, k, v = self.wq(x) * rope, self.wk(x) * rope, self.wv(x)
        if cache is not None:  # per-position state: records what this position wrote
            cache["k"] = k.detach()
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        T = x.shape[-2]
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return self.wo(att.softmax(-1) @ v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Pool(nn.Module):
    def __init__(self, slots: int, v_dim: int):
        super().__init__()
        self.values = nn.Parameter(torch.randn(slots, v_dim) * 0.1)


class Memory(nn.Module):
    """Memory-layer stand-in: soft read over a pool the *model* registers (plain attribute here)."""

    def __init__(self, dim: int, pool: Pool):
        super().__init__()
        slots, v_dim = pool.values.shape
        object.__setattr__(self, "pool", pool)  # like memlayers.ProductKeyMemory(own_pool=False)
        self.query = nn.Linear(dim, dim)
        self.keys = nn.Parameter(torch.randn(slots, dim) * 0.3)
        self.gate = nn.Linear(dim, v_dim)
        self.out = nn.Linear(v_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.query(x) @ self.keys.t()).softmax(-1)
        return self.out((w @ self.pool.values) * F.silu(self.gate(x)))


class Block(nn.Module):
    def __init__(self, layer_id: int, dim: int = 16, hidden: int = 24, pool: Pool | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = FeedForward(dim, hidden) if pool is None else Memory(dim, pool)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class MLPBlock(nn.Module):
    """A plain user block: x + MLP(LayerNorm(x)), no Llama names, no extra args."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Model(nn.Module):
    """Owns the layers (and the memory pool, if any); the loop passes rope and a per-position cache."""

    def __init__(self, layers: nn.ModuleList, dim: int = 16, pool: Pool | None = None):
        super().__init__()
        self.pool = pool
        self.layers = layers
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache=caches[i] if caches is not None else None)
        return self.head(x)


def make_layers(
    n: int = 3, dim: int = 16, memory_at: tuple[int, ...] = (), seed: int = 0
) -> tuple[nn.ModuleList, Pool | None]:
    torch.manual_seed(seed)
    pool = Pool(8, 12) if memory_at else None
    layers = nn.ModuleList(Block(i, dim, pool=pool if i in memory_at else None) for i in range(n))
    # Non-trivial norms so that untied/tied norm weights are distinguishable.
    with torch.no_grad():
        for b in layers:
            b.attention_norm.weight.uniform_(0.5, 1.5)
            b.ffn_norm.weight.uniform_(0.5, 1.5)
    return layers, pool


def run_stack(layers, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x, rope)
    return x
