"""scalenet on the real Llama blocks (launch.model) with a memory-layer FFN (memlayers), if present."""

from __future__ import annotations

import pytest
import torch

import scalenet

model_mod = pytest.importorskip("launch.models.llama")
memlayers = pytest.importorskip("memlayers")


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = model_mod.ModelConfig(dim=32, n_layers=3, n_heads=4, vocab_size=64, max_seq_len=16, multiple_of=16)
    pool = memlayers.MemoryPool(n_keys=4, v_dim=32)

    def ffn(i, c):
        return memlayers.ProductKeyMemory(dim=c.dim, pool=pool, heads=2, k_dim=8, knn=2) if i == 1 else None

    model = model_mod.Transformer(cfg, ffn_factory=ffn)
    model.memory_pool = pool  # the model owns the pool, the layers only reference it
    return model, pool


def test_grow_merge_and_kv_cache_on_llama_blocks():
    model, pool = build()
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    base_layers = model.layers
    model.layers = scalenet.grow(base_layers, adapter_rank=2)
    assert model.layers[4].feed_forward.pool is pool
    assert model.layers[4].feed_forward.keys is base_layers[1].feed_forward.keys
    # zero adapters: the grown model equals the base blocks applied in stack order
    rope = (model.rope_cos[:10], model.rope_sin[:10])
    h = model.tok_embeddings(tokens)
    for i in range(6):
        h = base_layers[i % 3](h, rope)
    torch.testing.assert_close(model(tokens), model.output(model.norm(h)))

    with torch.no_grad():
        for _, m in scalenet.adapters(model.layers):
            m.lora_B.normal_(0, 0.05)
    full = model(tokens)
    # decoding with per-position caches gives the same logits as the full pass
    caches = model.new_caches(batch=2)
    step = torch.cat(
        [model(tokens[:, :6], caches=caches), model(tokens[:, 6:], caches=caches, start_pos=6)], dim=1
    )
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)

    grown_layers = model.layers
    model.layers = scalenet.merge(grown_layers)
    assert model.layers[4].feed_forward.pool is pool
    torch.testing.assert_close(model(tokens), full, rtol=1e-4, atol=1e-5)
