"""Llama-style decoder: architecture only.

RMSNorm, rotary embeddings (Meta's interleaved-pair layout), grouped-query attention through
`F.scaled_dot_product_attention` (or xformers on CUDA), SwiGLU feed-forward. Blocks live in
`model.layers` (an `nn.ModuleList`) and each block's FFN is a pluggable module: `launch.build`
swaps in memory layers and applies depth growth; this file knows about neither.

Every block takes its KV cache as an argument, so a block instance reused at several depths
(ScaleNet growth) never shares cache state between its positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    dim: int = 256  # model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads)
    ffn_dim: int | None = None  # None: 8/3·dim rounded up to `multiple_of`
    multiple_of: int = 64  # FFN width is rounded up to a multiple of this
    vocab_size: int = 8192  # embedding rows (the tokenizer's size)
    max_seq_len: int = 256  # context window (RoPE positions)
    tie_embeddings: bool = True  # output projection shares the embedding matrix
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    attn_impl: str = "sdpa"  # sdpa | xformers
    init_std: float = 0.02  # std of the normal weight init

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self) -> None:
        """Raise ValueError naming the offending `model.*` key."""
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim model.dim/model.n_heads={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.kv_heads}"
            )
        if self.attn_impl not in ("sdpa", "xformers"):
            raise ValueError(f"model.attn_impl={self.attn_impl!r}: expected 'sdpa' or 'xformers'")
        for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 mean-of-squares loses too much precision.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim // 2) in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dim; x is (B, T, H, hd), cos/sin (T, hd/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of one block position, preallocated for `max_len` tokens."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, max_len, kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        if end > self.k.shape[1]:
            raise ValueError(f"KV cache holds {self.k.shape[1]} tokens; asked to write up to {end}")
        self.k[: k.shape[0], start:end] = k
        self.v[: v.shape[0], start:end] = v
        return self.k[: k.shape[0], :end], self.v[: v.shape[0], :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attn_impl = cfg.attn_impl

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        if self.attn_impl == "xformers":
            out = _xformers_attention(q, k, v, start_pos)
        else:
            out = _sdpa_attention(q, k, v, start_pos)
        return self.wo(out.reshape(B, T, -1))


def _sdpa_attention(q, k, v, start_pos: int) -> torch.Tensor:
    """q: (B, T, H, hd); k, v: (B, S, Hkv, hd) with S = start_pos + T. Returns (B, T, H, hd)."""
    T, S = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves n_heads/kv_heads heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if start_pos == 0 and S == T:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # decoding against a cache: query i sits at absolute position start_pos + i
        qpos = torch.arange(start_pos, start_pos + T, device=q.device)[:, None]
        mask = torch.arange(S, device=q.device)[None, :] <= qpos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def _xformers_attention(q, k, v, start_pos: int) -> torch.Tensor:
    if not q.is_cuda:
        raise RuntimeError("model.attn_impl=xformers needs CUDA tensors; use model.attn_impl=sdpa on CPU")
    try:
        from xformers.ops import LowerTriangularFromBottomRightMask, memory_efficient_attention
    except ImportError as e:
        raise RuntimeError("model.attn_impl=xformers needs the [gpu] extra: pip install xformers") from e
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    return memory_efficient_attention(q, k, v, attn_bias=LowerTriangularFromBottomRightMask())


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig, feed_forward: nn.Module | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = feed_forward if feed_forward is not None else FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x, rope, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache=cache, start_pos=start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


FFNFactory = Callable[[int, ModelConfig], nn.Module | None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_factory: FFNFactory | None = None):
        """`ffn_factory(layer_id, cfg)` may return a module to use as that block's FFN (None: SwiGLU)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(i, cfg, ffn_factory(i, cfg) if ffn_factory else None)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self, tokens: torch.Tensor, caches: list[KVCache] | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). With `caches` (one per layer position), attend to
        the cached prefix and write this chunk's keys/values at `start_pos`."""
        T = tokens.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        rope = (self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T])
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache=caches[i] if caches is not None else None, start_pos=start_pos)
        return self.output(self.norm(h))

    def new_caches(self, batch: int, max_len: int | None = None, dtype=None) -> list[KVCache]:
        """One KV cache per layer *position* (a shared block used twice gets two caches)."""
        device = self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        max_len = max_len or self.cfg.max_seq_len
        return [
            KVCache(batch, max_len, self.cfg.kv_heads, self.cfg.head_dim, dtype, device) for _ in self.layers
        ]

    def init_spec(self) -> dict[str, tuple]:
        """Each parameter's initial distribution by name: Normal(0, init_std) for linears and
        embeddings, the output projection of each residual branch (attention.wo, feed_forward.w2)
        scaled by 1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth
        (GPT-2 / torchtitan); norms 1, biases 0; low-rank adapters (ScaleNet) A ~ U(±1/sqrt(in)),
        B = 0; submodules with their own `init_spec` (memory layers, value pools) declare theirs."""
        from launch.distributed.param_init import module_specs

        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)

        def rule(mname: str, module: nn.Module, pname: str) -> tuple:
            if pname == "bias":
                return ("constant", 0.0)
            if pname == "lora_B":
                return ("constant", 0.0)
            if pname == "lora_A":
                bound = 1.0 / math.sqrt(module.in_features)
                return ("uniform", -bound, bound)
            if isinstance(module, RMSNorm):
                return ("constant", 1.0)
            if isinstance(module, nn.Linear | nn.Embedding):
                is_out = mname.endswith("attention.wo") or mname.endswith("feed_forward.w2")
                return ("normal", 0.0, out_std if is_out else std)
            raise KeyError(f"no initialisation rule for {mname}.{pname} ({type(module).__name__})")

        return module_specs(self, rule)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, regions: dict | None = None) -> None:
        """Initialise in place, also after `to_empty` and on shards: see `launch.param_init` (each
        tensor drawn row block by row block from generators seeded by `seed` and its name, so the
        result does not depend on the parallel layout). `regions` describes plain parameters that
        hold a block of a larger tensor (memory-value column shards). Without `seed`, one is drawn
        from the global RNG: seed that first for a reproducible init."""
        from launch.distributed.param_init import init_parameters

        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.init_buffers()
        init_parameters(self, self.init_spec(), seed, regions)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The RoPE tables (non-persistent buffers: recomputed, never loaded) and the running
        estimates of any normalisation that keeps them (memory query batchnorm)."""
        device = self.rope_cos.device
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for m in self.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total
