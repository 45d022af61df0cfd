"""The one name map between our state dict and Hugging Face Llama's, and the RoPE row permutation.

Ours (launch.model)                          Hugging Face (LlamaForCausalLM)
    tok_embeddings.weight                        model.embed_tokens.weight
    layers.{i}.attention_norm.weight             model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.wq/wk/wv/wo.weight      model.layers.{i}.self_attn.q_proj/k_proj/v_proj/o_proj.weight
    layers.{i}.ffn_norm.weight                   model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.w1/w3/w2.weight      model.layers.{i}.mlp.gate_proj/up_proj/down_proj.weight
    layers.{i}.feed_forward.<memory params>      model.layers.{i}.mlp.<same>      (memory layers)
    memory_pools.{j}.values                      model.memory_pools.{j}.values    (memory models)
    norm.weight                                  model.norm.weight
    output.weight                                lm_head.weight

RoPE: our attention rotates interleaved pairs (2i, 2i+1) of each head, HF rotates (i, i + hd/2).
Reordering the rows of wq and wk per head makes both compute the same attention scores (q·k is
invariant to applying one permutation to both), so the export permutes those rows and the
import applies the inverse. Both are pure index shuffles: a round trip is bitwise exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

PER_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    # product-key memory in place of the MLP (memlayers.ProductKeyMemory / the exported modeling file)
    "feed_forward.query.weight": "mlp.query.weight",
    "feed_forward.query.bias": "mlp.query.bias",
    "feed_forward.keys": "mlp.keys",
    "feed_forward.gate.weight": "mlp.gate.weight",
    "feed_forward.gate.bias": "mlp.gate.bias",
    "feed_forward.out.weight": "mlp.out.weight",
    "feed_forward.out.bias": "mlp.out.bias",
    "feed_forward.query_norm.weight": "mlp.query_norm.weight",
    "feed_forward.query_norm.bias": "mlp.query_norm.bias",
    "feed_forward.query_norm.running_mean": "mlp.query_norm.running_mean",
    "feed_forward.query_norm.running_var": "mlp.query_norm.running_var",
}

POOL = ("memory_pools.{j}.values", "model.memory_pools.{j}.values")

# rows permuted for RoPE, and which head count splits them
ROPE_ROWS = {"attention.wq.weight": "n_heads", "attention.wk.weight": "kv_heads"}

_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_POOL = re.compile(r"^memory_pools\.(\d+)\.values$")
_HF_POOL = re.compile(r"^model\.memory_pools\.(\d+)\.values$")
_HF_PER_LAYER = {v: k for k, v in PER_LAYER.items()}
_HF_TOP_LEVEL = {v: k for k, v in TOP_LEVEL.items()}


def to_hf_name(name: str) -> str:
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    if (m := _OUR_LAYER.match(name)) and m.group(2) in PER_LAYER:
        return f"model.layers.{m.group(1)}.{PER_LAYER[m.group(2)]}"
    if m := _OUR_POOL.match(name):
        return POOL[1].format(j=m.group(1))
    raise KeyError(f"no Hugging Face name for tensor '{name}' (not a plain Llama / memory-layer parameter)")


def from_hf_name(name: str) -> str:
    if name in _HF_TOP_LEVEL:
        return _HF_TOP_LEVEL[name]
    if (m := _HF_LAYER.match(name)) and m.group(2) in _HF_PER_LAYER:
        return f"layers.{m.group(1)}.{_HF_PER_LAYER[m.group(2)]}"
    if m := _HF_POOL.match(name):
        return POOL[0].format(j=m.group(1))
    raise KeyError(f"tensor '{name}' has no counterpart in launch.model")


def rope_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of one projection, per head from (pair i: rows 2i, 2i+1) to (rows i, i + hd/2)."""
    out_dim, in_dim = w.shape
    hd = out_dim // heads
    return w.view(heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def rope_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`rope_to_hf`."""
    out_dim, in_dim = w.shape
    hd = out_dim // heads
    return w.view(heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _rope_heads(name: str, n_heads: int, kv_heads: int) -> int | None:
    m = _OUR_LAYER.match(name)
    key = ROPE_ROWS.get(m.group(2)) if m else None
    return {"n_heads": n_heads, "kv_heads": kv_heads}.get(key) if key else None


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], n_heads: int, kv_heads: int
) -> dict[str, torch.Tensor]:
    """Our (alias-free) state dict -> HF names, wq/wk rows permuted for rotate_half RoPE."""
    out = {}
    for name, t in state.items():
        heads = _rope_heads(name, n_heads, kv_heads)
        out[to_hf_name(name)] = (rope_to_hf(t, heads) if heads else t).contiguous()
    return out


def from_hf_state_dict(
    state: Mapping[str, torch.Tensor], n_heads: int, kv_heads: int
) -> dict[str, torch.Tensor]:
    """HF Llama state dict -> our names, wq/wk rows back in interleaved-pair order."""
    out = {}
    for hf_name, t in state.items():
        name = from_hf_name(hf_name)
        heads = _rope_heads(name, n_heads, kv_heads)
        out[name] = (rope_from_hf(t, heads) if heads else t).contiguous()
    return out
