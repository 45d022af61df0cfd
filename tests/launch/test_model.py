import math

import pytest
import torch

from launch.models.llama import Attention, ModelConfig, Transformer, apply_rope, rope_tables


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def make_model(**kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(tiny_cfg(**kw))
    m.init_weights()
    return m.double()


def test_causality_future_tokens_never_change_past_logits():
    m = make_model()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 64, (2, 6))
    assert not torch.equal(x, y)
    lx, ly = m(x), m(y)
    torch.testing.assert_close(lx[:, :10], ly[:, :10], rtol=0, atol=1e-12)
    assert (lx[:, 10:] - ly[:, 10:]).abs().max() > 1e-6  # the test can fail: later positions do change


def naive_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Complex-number rotation, position by position: pair (x[2i], x[2i+1]) is z = a + ib, rotated by t·θ_i."""
    B, T, H, D = x.shape
    out = torch.empty_like(x)
    for t in range(T):
        for i in range(D // 2):
            freq = 1.0 / theta ** (2 * i / D)
            rot = complex(math.cos(t * freq), math.sin(t * freq))
            z = torch.complex(x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]) * rot
            out[:, t, :, 2 * i], out[:, t, :, 2 * i + 1] = z.real, z.imag
    return out


def test_rope_matches_complex_rotation_reference():
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    cos, sin = rope_tables(8, 7, 10000.0)
    got = apply_rope(x.float(), cos, sin).double()
    torch.testing.assert_close(got, naive_rope(x, 10000.0), rtol=1e-5, atol=1e-5)


def test_rope_relative_position_property():
    # q·k after RoPE depends only on the distance between positions.
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_tables(16, 20, 10000.0)

    def dot(i, j):
        return (
            apply_rope(q, cos[i : i + 1], sin[i : i + 1]) * apply_rope(k, cos[j : j + 1], sin[j : j + 1])
        ).sum()

    torch.testing.assert_close(dot(5, 2), dot(13, 10), rtol=1e-4, atol=1e-5)


def naive_gqa(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Loops over heads; head h reads kv head h // (n_heads / kv_heads); explicit causal softmax."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = apply_rope(attn.wq(x).view(B, T, attn.n_heads, hd), cos, sin)
    k = apply_rope(attn.wk(x).view(B, T, attn.kv_heads, hd), cos, sin)
    v = attn.wv(x).view(B, T, attn.kv_heads, hd)
    group = attn.n_heads // attn.kv_heads
    heads = []
    for h in range(attn.n_heads):
        kv = h // group
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, kv])
    return attn.wo(torch.stack(heads, dim=2).reshape(B, T, -1))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_attention_matches_naive_reference(kv_heads):
    m = make_model(n_kv_heads=kv_heads)
    attn = m.layers[0].attention
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    rope = (m.rope_cos[:9].double(), m.rope_sin[:9].double())
    torch.testing.assert_close(attn(x, rope), naive_gqa(attn, x, *rope), rtol=1e-9, atol=1e-9)


def test_kv_cache_decoding_matches_full_forward():
    m = make_model()
    x = torch.randint(0, 64, (2, 12))
    full = m(x)
    caches = m.new_caches(2, 16)
    parts = [m(x[:, :5], caches=caches, start_pos=0)]
    for t in range(5, 12):
        parts.append(m(x[:, t : t + 1], caches=caches, start_pos=t))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


def test_tied_and_untied_embeddings():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_output_projections_are_depth_scaled():
    torch.manual_seed(0)
    m = Transformer(tiny_cfg(dim=256, n_heads=4, n_layers=8, vocab_size=32))
    m.init_weights()
    wq, wo = m.layers[0].attention.wq.weight.std().item(), m.layers[0].attention.wo.weight.std().item()
    assert abs(wq - 0.02) < 2e-3
    assert abs(wo - 0.02 / math.sqrt(16)) < 1e-3
    assert torch.all(m.layers[0].attention_norm.weight == 1)


def test_init_is_reproducible_under_seed():
    a, b = make_model(), make_model()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_configs_raise_naming_the_key():
    with pytest.raises(ValueError, match="model.n_heads"):
        tiny_cfg(dim=30).validate()
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_cfg(n_kv_heads=3).validate()
    with pytest.raises(ValueError, match="attn_impl"):
        tiny_cfg(attn_impl="flash").validate()
    m = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 40, dtype=torch.long))


def test_xformers_needs_cuda():
    m = make_model(attn_impl="xformers")
    with pytest.raises(RuntimeError, match="CUDA"):
        m(torch.zeros(1, 4, dtype=torch.long))
