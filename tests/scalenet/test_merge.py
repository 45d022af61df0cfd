"""merge(): same function as the trained grown stack, plain blocks, nothing shared (except the pool)."""

from __future__ import annotations

import scalenet_test_toys as toys
import torch
from torch import nn

from scalenet import AdaptedLinear, adapters, count_params, grow, merge


def train_a_few_steps(model: nn.Module, x, rope, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        model(x, rope).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_merge_matches_trained_grown_stack_and_shares_nothing():
    layers, pool = toys.make_layers(3, memory_at=(1,))
    grown = grow(layers, mapping=[0, 1, 2, 0, 1, 2, 1], adapter_rank=3, untie_norms=True)
    model = toys.Model(grown, pool=pool)
    x, rope = torch.randn(2, 5, 16), torch.rand(16) + 0.5
    train_a_few_steps(model, x, rope)
    assert all(torch.count_nonzero(m.lora_B) > 0 for _, m in adapters(grown))

    plain = merge(grown)
    assert isinstance(plain, nn.ModuleList) and len(plain) == len(grown)
    for block in plain:
        assert type(block) is toys.Block
        assert not any(isinstance(m, AdaptedLinear) for m in block.modules())
        assert all(type(m) is nn.Linear for m in block.modules() if isinstance(m, nn.Linear))

    merged_model = toys.Model(plain, pool=pool)
    merged_model.head = model.head
    torch.testing.assert_close(merged_model(x, rope), model(x, rope), rtol=1e-5, atol=1e-6)

    # no storage shared between positions, nor with the grown stack's tensors
    ptrs = [p.data_ptr() for p in plain.parameters()]
    assert len(ptrs) == len(set(ptrs))
    grown_ptrs = {p.data_ptr() for p in grown.parameters()}
    assert not grown_ptrs & set(ptrs)
    per_block = count_params(layers[0]), count_params(layers[1]), count_params(layers[2])
    assert count_params(plain) == sum(per_block[s] for s in [0, 1, 2, 0, 1, 2, 1])
    # the memory layer's pool is the model's and stays shared
    assert plain[1].feed_forward.pool is pool and plain[4].feed_forward.pool is pool
    assert plain[1].feed_forward.keys.data_ptr() != plain[4].feed_forward.keys.data_ptr()


def test_merged_weight_is_w_plus_scaled_ba():
    layers, _ = toys.make_layers(1)
    grown = grow(layers, adapter_rank=2, adapter_alpha=8.0)
    ad = grown[1].attention.wv
    with torch.no_grad():
        ad.lora_B.normal_()
    plain = merge(grown)
    want = layers[0].attention.wv.weight + (8.0 / 2) * ad.lora_B @ ad.lora_A
    torch.testing.assert_close(plain[1].attention.wv.weight, want)
    torch.testing.assert_close(plain[0].attention.wv.weight, layers[0].attention.wv.weight)
