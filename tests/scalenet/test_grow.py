"""grow(): ties, mapping semantics, pass-through of forward args, counts, gradients, errors."""

from __future__ import annotations

import copy

import pytest
import scalenet_test_toys as toys
import torch
from torch import nn

from scalenet import AdaptedLinear, adapters, count_params, grow, grow_by_strategy, merge

DIM = 16


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, DIM, generator=g), torch.rand(DIM, generator=g) + 0.5


def linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def test_positions_reuse_source_parameter_objects():
    layers, pool = toys.make_layers(3, memory_at=(1,))
    new = grow(layers)
    assert len(new) == 6 and isinstance(new, nn.ModuleList)
    for i, block in enumerate(new):
        src = layers[i % 3]
        assert type(block) is type(src) and block is not src
        assert block.layer_id == src.layer_id
        own = dict(block.named_parameters())
        for name, p in src.named_parameters():
            assert own[name] is p and own[name].data_ptr() == p.data_ptr(), name
        for name in linear_names(src):
            assert isinstance(block.get_submodule(name), AdaptedLinear), name
    # adapters are per position, never shared
    assert new[0].attention.wq.lora_A is not new[3].attention.wq.lora_A
    assert new[1].feed_forward.pool is pool and new[4].feed_forward.pool is pool
    # the input stack is left as it was: plain linears, no adapters
    assert not any(isinstance(m, AdaptedLinear) for m in layers.modules())


@pytest.mark.parametrize(
    "mapping,depth,expected",
    [
        ("stack", None, [0, 1, 2, 0, 1, 2]),
        ("interleave", None, [0, 0, 1, 1, 2, 2]),
        ("stack", 4, [0, 1, 2, 0]),
        ("interleave", 9, [0, 0, 0, 1, 1, 1, 2, 2, 2]),
        ([2, 0, 0, 1, 2], None, [2, 0, 0, 1, 2]),
    ],
)
def test_zero_adapters_compute_mapped_blocks_in_order(mapping, depth, expected):
    layers, _ = toys.make_layers(3, memory_at=(2,))
    new = grow(layers, depth=depth, mapping=mapping, adapter_rank=4)
    for i, src in enumerate(expected):
        assert new[i].attention.wk.weight is layers[src].attention.wk.weight
    x, rope = inputs()
    caches = [{} for _ in new]
    y = x
    for i, layer in enumerate(new):
        y = layer(y, rope, cache=caches[i])
    ref = x
    ref_caches = [{} for _ in expected]
    for i, src in enumerate(expected):
        ref = layers[src](ref, rope, cache=ref_caches[i])
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for got, want in zip(caches, ref_caches):  # each position wrote its own cache
        torch.testing.assert_close(got["k"], want["k"], rtol=0, atol=0)
    assert not torch.equal(caches[0]["k"], caches[len(layers)]["k"]) or len(new) <= len(layers)


def test_plain_user_block():
    torch.manual_seed(0)
    layers = nn.ModuleList(toys.MLPBlock(DIM) for _ in range(2))
    new = grow(layers, mapping="interleave", adapter_rank=3)
    assert new[1].net[1].weight is layers[0].net[1].weight
    assert isinstance(new[1].net[3], AdaptedLinear)
    x = torch.randn(4, DIM)
    torch.testing.assert_close(
        new[3](new[2](new[1](new[0](x)))), layers[1](layers[1](layers[0](layers[0](x))))
    )
    r = 3
    assert count_params(new) == count_params(layers) + 4 * (r * (DIM + 2 * DIM) + r * (2 * DIM + DIM))


def adapter_formula(layers: nn.ModuleList, mapping: list[int], r: int, targets=None) -> int:
    from scalenet.grow import normalize_targets, targeted_linears

    pats = normalize_targets(targets)
    return sum(
        r * (m.in_features + m.out_features) for s in mapping for _, m in targeted_linears(layers[s], pats)
    )


@pytest.mark.parametrize("targets", [None, ["wq", "wv"], ["feed_forward.*"], "attention.wo"])
def test_param_count_is_base_plus_adapters(targets):
    layers, _ = toys.make_layers(3, memory_at=(1,))
    r = 4
    new = grow(layers, mapping="interleave", adapter_rank=r, targets=targets)
    added = adapter_formula(layers, [0, 0, 1, 1, 2, 2], r, targets)
    assert added > 0
    assert count_params(new) == count_params(layers) + added
    naive = sum(p.numel() for p in new.parameters())  # parameters() dedups shared objects too
    assert naive == count_params(new)
    # and the duplicate-counting sum over positions would have been larger
    assert sum(count_params(b) for b in new) > count_params(new)


def test_targets_select_linears():
    layers, _ = toys.make_layers(2)
    new = grow(layers, adapter_rank=2, targets=["wq", "feed_forward.w2"])
    adapted = sorted({n.split(".", 1)[1] for n, _ in adapters(new)})
    assert adapted == ["attention.wq", "feed_forward.w2"]


def test_rank_zero_means_pure_sharing():
    layers, _ = toys.make_layers(2)
    new = grow(layers, adapter_rank=0)
    assert not adapters(new)
    assert count_params(new) == count_params(layers)
    assert new[2].attention.wq.weight is layers[0].attention.wq.weight


def test_untie_norms_gives_each_position_its_own_copy():
    layers, _ = toys.make_layers(2)
    new = grow(layers, adapter_rank=2, untie_norms=True)
    w0, w2 = new[0].attention_norm.weight, new[2].attention_norm.weight
    assert w0 is not w2 and w0 is not layers[0].attention_norm.weight
    torch.testing.assert_close(w0, layers[0].attention_norm.weight)
    torch.testing.assert_close(w2, layers[0].attention_norm.weight)
    assert new[0].attention.wq.weight is new[2].attention.wq.weight  # everything else stays tied
    norm_numel = sum(p.numel() for b in layers for n, p in b.named_parameters() if "norm" in n)
    assert count_params(new) == count_params(layers) + norm_numel + adapter_formula(layers, [0, 1, 0, 1], 2)


def test_ties_survive_optimizer_steps_and_adapters_train():
    layers, pool = toys.make_layers(3, memory_at=(1,))
    model = toys.Model(grow(layers, adapter_rank=2), pool=pool)
    before = {n: p.detach().clone() for n, p in layers.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, rope = inputs()
    out0 = model(x, rope).detach()
    for _ in range(3):
        model(x, rope).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for i, block in enumerate(model.layers):
        src = layers[i % 3]
        for name, p in src.named_parameters():
            q = block.get_parameter(name)
            assert q is p and q.data_ptr() == p.data_ptr(), name
    assert not torch.equal(layers[0].attention.wq.weight, before["0.attention.wq.weight"])
    assert all(torch.count_nonzero(m.lora_B) > 0 for _, m in adapters(model.layers))
    assert not torch.allclose(model(x, rope), out0)


def test_shared_grad_is_sum_over_instances():
    """d loss / d W_shared = Σ_positions d loss / d W_position, checked two ways: against an untied
    stack_copy model (zero adapters) and against the merged model (non-zero adapters)."""
    layers, pool = toys.make_layers(3, memory_at=(1,))
    layers = layers.double()
    pool.double()
    x, rope = (t.double() for t in inputs())

    grown = grow(layers, adapter_rank=2)
    copies, _ = grow_by_strategy(copy.deepcopy(layers, {id(pool): pool}), "stack_copy")
    toys.run_stack(grown, x, rope).pow(2).sum().backward()
    toys.run_stack(copies, x, rope).pow(2).sum().backward()
    names = ["attention.wq.weight", "feed_forward.w1.weight", "attention_norm.weight"]
    for src in (0, 2):
        for name in names:
            want = copies[src].get_parameter(name).grad + copies[src + 3].get_parameter(name).grad
            torch.testing.assert_close(layers[src].get_parameter(name).grad, want)
    torch.testing.assert_close(  # memory block's keys too
        layers[1].feed_forward.keys.grad, copies[1].feed_forward.keys.grad + copies[4].feed_forward.keys.grad
    )

    layers.zero_grad()
    with torch.no_grad():
        for _, m in adapters(grown):
            m.lora_B.normal_(0, 0.1)
    merged = merge(grown)
    toys.run_stack(grown, x, rope).pow(2).sum().backward()
    toys.run_stack(merged, x, rope).pow(2).sum().backward()
    want = merged[0].attention.wq.weight.grad + merged[3].attention.wq.weight.grad
    torch.testing.assert_close(layers[0].attention.wq.weight.grad, want)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"mapping": []}, ValueError, "mapping is empty"),
        ({"mapping": [0, 3]}, ValueError, r"mapping\[1\]=3 is out of range.*\[0, 3\)"),
        ({"mapping": [0, -1]}, ValueError, "out of range"),
        ({"mapping": ["0", "1"]}, TypeError, r"mapping\[0\]='0' \(str\)"),
        ({"mapping": [0.0]}, TypeError, "int source indices"),
        ({"mapping": "zigzag"}, ValueError, "unknown mapping 'zigzag'"),
        ({"mapping": 3}, TypeError, "mapping must be"),
        (
            {"mapping": [0, 1, 2], "depth": 4},
            ValueError,
            "depth=4 disagrees with the explicit mapping of length 3",
        ),
        ({"mapping": "interleave", "depth": 7}, ValueError, "multiple of the base depth L=3"),
        ({"depth": 0}, ValueError, "depth must be a positive int"),
        ({"adapter_rank": -1}, ValueError, "adapter_rank must be >= 0 .0 = no adapters"),
        ({"adapter_rank": 2.5}, TypeError, "adapter_rank must be an int"),
        ({"targets": ["wq", "nope"]}, ValueError, r"targets \['nope'\] match no nn.Linear.*attention.wq"),
        ({"targets": []}, ValueError, "targets is empty"),
        ({"targets": [1]}, TypeError, "targets must be"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, exc, match):
    layers, _ = toys.make_layers(3)
    with pytest.raises(exc, match=match):
        grow(layers, **kwargs)


def test_bad_layers_fail_clearly():
    with pytest.raises(ValueError, match="layers is empty"):
        grow(nn.ModuleList())
    with pytest.raises(TypeError, match="nn.ModuleList of blocks, got a single Linear"):
        grow(nn.Linear(2, 2))
    layers, _ = toys.make_layers(2)
    with pytest.raises(ValueError, match="already holds scalenet adapters: merge"):
        grow(grow(layers))


def test_meta_device_growth_stays_tied_through_to_empty_tied():
    from scalenet import reset_adapters, to_empty_tied

    with torch.device("meta"):
        layers = nn.ModuleList(toys.Block(i) for i in range(2))
    grown = grow(layers, adapter_rank=2)
    to_empty_tied(grown, "cpu")
    assert grown[0].attention.wq.weight is grown[2].attention.wq.weight is layers[0].attention.wq.weight
    assert grown[0].attention.wq.weight.device.type == "cpu"
    for m in grown.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    reset_adapters(grown)
    assert all(torch.count_nonzero(m.lora_B) == 0 for _, m in adapters(grown))
    x, rope = inputs()
    torch.testing.assert_close(toys.run_stack(grown, x, rope), toys.run_stack([*layers, *layers], x, rope))
    # plain to_empty is what this guards against: it gives each alias its own new parameter
    with torch.device("meta"):
        again = grow(nn.ModuleList(toys.Block(i) for i in range(2)))
    again.to_empty(device="cpu")
    assert again[0].attention.wq.weight is not again[2].attention.wq.weight


class _BatchNormBlock(nn.Module):
    """A block with running statistics: x + W2 relu(BN(W1 x)) over (tokens, features)."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.w1, self.bn, self.w2 = nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.relu(self.bn(self.w1(x))))


def test_positions_share_parameters_but_keep_their_own_running_statistics():
    from scalenet import to_empty_tied

    torch.manual_seed(0)
    layers = nn.ModuleList(_BatchNormBlock() for _ in range(2))
    with torch.no_grad():
        layers[0].bn.running_mean.normal_()
    grown = grow(layers, adapter_rank=2)
    assert grown[2].bn.weight is grown[0].bn.weight is layers[0].bn.weight  # parameters tied
    assert grown[2].bn.running_mean is not grown[0].bn.running_mean  # statistics per position
    torch.testing.assert_close(grown[2].bn.running_mean, layers[0].bn.running_mean)  # copied values
    x = torch.randn(32, DIM, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for block in grown:  # train mode: each position updates its own estimates from its own inputs
        x = block(x)
    assert not torch.allclose(grown[0].bn.running_mean, grown[2].bn.running_mean)
    state = grown.state_dict()
    assert not torch.equal(state["0.bn.running_var"], state["2.bn.running_var"])
    # rebuilt on meta (as a checkpoint load does): ties come back, every position loads its own statistics
    with torch.device("meta"):
        again = grow(nn.ModuleList(_BatchNormBlock() for _ in range(2)), adapter_rank=2)
    to_empty_tied(again, "cpu")
    again.load_state_dict(state)
    assert again[2].w1.weight is again[0].w1.weight
    for name, t in again.state_dict().items():
        assert torch.equal(t, state[name]), name
