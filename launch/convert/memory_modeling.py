"""A Llama whose listed layers use a product-key memory (Memory+) as their MLP, in plain torch.

Remote code: `launch.convert to-hf` copies this file (and memory_configuration.py) verbatim next
to the weights of an exported memory model, so

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

loads it. It imports only torch and transformers and re-implements memlayers.ProductKeyMemory's
forward operation for operation (same dtypes, same top-K order), so logits match the native model.
Everything but the MLPs of the memory layers is stock LlamaForCausalLM (attention, cache, generate).

Per token x (d dims), H heads, keys of dim k (halves of k/2), N sub-keys per half, top-K:
    q = query(x) as (H, 2, k/2); scores of each half against its N sub-keys; top-K per half
    K*K candidates (s1 + s2, slot i1*N + i2); top-K of those; w = softmax in fp32
    read = sum over the H*K picks of w * values[slot];  y = out(read * silu(gate(x)))  (or out(read))
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from .memory_configuration import MemoryLlamaConfig

QK_NORM_EPS = 1e-6


def _rms_norm(t: torch.Tensor, eps: float) -> torch.Tensor:
    if hasattr(F, "rms_norm"):  # the op the native layer uses (bitwise the same scores)
        return F.rms_norm(t, (t.shape[-1],), eps=eps)
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)


class QueryBatchNorm(nn.Module):
    """Batch norm of the query features (memlayers.QueryBatchNorm): batch statistics in training
    (this process's tokens), the running estimates in eval."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.training:
            var, mean = torch.var_mean(q, dim=0, unbiased=False)
            if q.shape[0] > 1:
                with torch.no_grad():
                    unbiased = var * (q.shape[0] / (q.shape[0] - 1))
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(q.dtype), self.running_var.to(q.dtype)
        return (q - mean) * torch.rsqrt(var + self.eps) * self.weight.to(q.dtype) + self.bias.to(q.dtype)


class MemoryValuePool(nn.Module):
    """One value table, read by every memory layer whose pool id points at it."""

    def __init__(self, n_keys: int, v_dim: int):
        super().__init__()
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, v_dim))


class ProductKeyMemoryMLP(nn.Module):
    def __init__(self, config: MemoryLlamaConfig, pool: MemoryValuePool):
        super().__init__()
        setting = config.memory_setting
        dim, bias = config.hidden_size, setting("memory_bias")
        self.heads, self.k_dim, self.knn = (
            setting("memory_heads"),
            setting("memory_k_dim"),
            setting("memory_knn"),
        )
        self.n_keys, self.v_dim = setting("memory_n_keys"), setting("memory_v_dim")
        self.qk_norm = setting("memory_qk_norm")
        self.query = nn.Linear(dim, self.heads * self.k_dim, bias=bias)
        self.query_norm = (
            QueryBatchNorm(self.heads * self.k_dim) if setting("memory_query_batchnorm") else None
        )
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, self.k_dim // 2))
        self.gate = nn.Linear(dim, self.v_dim, bias=bias) if setting("memory_gated") else None
        self.out = nn.Linear(self.v_dim, dim, bias=bias)
        # Kept out of _modules: the pool is registered once, at model.memory_pools, so its values
        # have one state-dict name however many layers read them.
        object.__setattr__(self, "pool", pool)

    def select(self, x: torch.Tensor):
        """(T, d) tokens -> (T, H*K) slot ids and (T, H*K) weights."""
        T = x.shape[0]
        H, half, N, K = self.heads, self.k_dim // 2, self.n_keys, self.knn
        q = self.query(x)
        acc = torch.promote_types(self.keys.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = q.to(acc)
            if self.query_norm is not None:
                q = self.query_norm(q)
            q = q.view(T, H, 2, half)
            keys = self.keys.to(acc)
            if self.qk_norm:
                q, keys = _rms_norm(q, QK_NORM_EPS), _rms_norm(keys, QK_NORM_EPS)
            scores = torch.einsum("thcd,hcnd->thcn", q, keys)
            top_s, top_i = scores.topk(K, dim=-1)
            s1, s2 = top_s[:, :, 0], top_s[:, :, 1]
            i1, i2 = top_i[:, :, 0], top_i[:, :, 1]
            cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).view(T, H, K * K)
            best_s, best_pos = cand.topk(K, dim=-1)
            slot = i1.gather(-1, best_pos // K) * N + i2.gather(-1, best_pos % K)
            weights = best_s.softmax(dim=-1)
        return slot.reshape(T, H * K), weights.reshape(T, H * K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        slot, weights = self.select(x2)
        values = self.pool.values
        read = F.embedding_bag(slot, values, mode="sum", per_sample_weights=weights.to(values.dtype))
        if self.gate is not None:
            read = read * F.silu(self.gate(x2))
        return self.out(read).reshape(*lead, -1)


class MemoryLlamaForCausalLM(LlamaForCausalLM):
    config_class = MemoryLlamaConfig

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__(config)
        layers = list(config.memory_setting("memory_layers"))
        pool_ids = list(config.memory_setting("memory_pool_ids")) or [0] * len(layers)
        if len(pool_ids) != len(layers):
            raise ValueError(
                f"config.memory_pool_ids has {len(pool_ids)} entries but memory_layers lists {len(layers)} layers"
            )
        n_keys, v_dim = config.memory_setting("memory_n_keys"), config.memory_setting("memory_v_dim")
        self.model.memory_pools = nn.ModuleList(
            MemoryValuePool(n_keys, v_dim) for _ in range(config.memory_setting("memory_n_pools"))
        )
        for layer, pool_id in zip(layers, pool_ids):
            self.model.layers[layer].mlp = ProductKeyMemoryMLP(config, self.model.memory_pools[pool_id])
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Same distributions as memlayers (only used for weights missing from a checkpoint).
        if isinstance(module, ProductKeyMemoryMLP):
            bound = 1.0 / math.sqrt(module.k_dim)
            nn.init.uniform_(module.keys, -bound, bound)
        elif isinstance(module, MemoryValuePool):
            nn.init.normal_(module.values, mean=0.0, std=module.values.shape[1] ** -0.5)
        elif isinstance(module, QueryBatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
