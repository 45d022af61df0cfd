"""Growth strategies, their specs, and rebuild()."""

from __future__ import annotations

import json

import pytest
import scalenet_test_toys as toys
import torch
from torch import nn

from scalenet import (
    STRATEGIES,
    grow_by_strategy,
    load_unique_state_dict,
    rebuild,
    register_strategy,
    unique_state_dict,
)

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
ROPE = torch.rand(16, generator=torch.Generator().manual_seed(4)) + 0.5


def all_ptrs(layers: nn.ModuleList) -> list[int]:
    return [p.data_ptr() for b in layers for p in b.parameters()]


@pytest.mark.parametrize(
    "strategy,expected", [("stack_copy", [0, 1, 2, 0, 1, 2]), ("interleave_copy", [0, 0, 1, 1, 2, 2])]
)
def test_copy_strategies_are_untied_copies(strategy, expected):
    layers, pool = toys.make_layers(3, memory_at=(0,))
    new, spec = grow_by_strategy(layers, strategy)
    assert spec["mapping"] == expected and spec["depth"] == 6
    ptrs = all_ptrs(new)
    assert len(ptrs) == len(set(ptrs)), "copies must not share storage"
    for i, s in enumerate(expected):
        torch.testing.assert_close(new[i].attention.wq.weight, layers[s].attention.wq.weight)
    assert new[expected.index(0)] is layers[0]  # first use is the block itself
    assert all(b.feed_forward.pool is pool for i, b in enumerate(new) if expected[i] == 0)
    y = toys.run_stack(new, X, ROPE)
    torch.testing.assert_close(y, toys.run_stack([layers[s] for s in expected], X, ROPE))


@pytest.mark.parametrize("memory", [False, True])
def test_llama_pro_is_exactly_the_base_function_at_init(memory):
    layers, pool = toys.make_layers(4, memory_at=(1, 3) if memory else ())
    base_out = toys.run_stack(layers, X, ROPE).detach()
    new, spec = grow_by_strategy(layers, "llama_pro", depth=6)
    assert spec["mapping"] == [0, 1, 1, 2, 3, 3] and spec["options"]["every"] == 2
    inserted = new[2]
    assert (
        inserted is not layers[1]
        and inserted.attention.wq.weight.data_ptr() != layers[1].attention.wq.weight.data_ptr()
    )
    assert torch.count_nonzero(inserted.attention.wo.weight) == 0
    out_name = "feed_forward.out.weight" if memory else "feed_forward.w2.weight"
    assert torch.count_nonzero(inserted.get_parameter(out_name)) == 0
    torch.testing.assert_close(toys.run_stack(new, X, ROPE), base_out, rtol=0, atol=0)

    # one training step makes the inserted blocks non-identity: the equality above can fail
    model = toys.Model(new, pool=pool)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(X, ROPE).pow(2).mean().backward()
    opt.step()
    assert not torch.allclose(toys.run_stack(new, X, ROPE), base_out)


def test_llama_pro_freeze_original_and_every():
    layers, _ = toys.make_layers(6)
    new, spec = grow_by_strategy(layers, "llama_pro", every=3, freeze_original=True)
    assert spec["mapping"] == [0, 1, 2, 2, 3, 4, 5, 5] and spec["depth"] == 8
    inserted = {3, 7}
    for pos, b in enumerate(new):
        assert all(p.requires_grad == (pos in inserted) for p in b.parameters()), pos


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"depth": 7}, "do not split evenly for 3 insertions"),
        ({"depth": 4}, "needs depth > L=4"),
        ({"every": 3, "depth": 6}, "need 6 > L=4"),
        ({"zero_init": ["attention.nope"]}, r"zero_init \['attention.nope'\] matches nothing in block 0"),
        ({"zero_init": ["attention.wo", "ffn.w9"]}, r"zero_init names \['ffn.w9'\] were not found"),
        ({"mapping": "interleave"}, "derives its mapping from depth/every"),
        ({"targets": ["wq"]}, "only strategy='scalenet'"),
    ],
)
def test_llama_pro_errors(opts, match):
    layers, _ = toys.make_layers(4)
    with pytest.raises(ValueError, match=match):
        grow_by_strategy(layers, "llama_pro", **opts)


def test_solar_dus_structure():
    layers, _ = toys.make_layers(4)
    new, spec = grow_by_strategy(layers, "solar_dus", m=1)
    assert spec["mapping"] == [0, 1, 2, 1, 2, 3] and spec["depth"] == 6 == 2 * 4 - 2
    assert [new[i] is layers[i] for i in range(3)] == [True] * 3
    assert new[5] is layers[3]  # not repeated: used once, so it stays the original block
    for pos, src in ((3, 1), (4, 2)):  # the overlap at the seam is copied, untied
        assert new[pos] is not layers[src]
        assert new[pos].attention.wq.weight.data_ptr() != layers[src].attention.wq.weight.data_ptr()
        torch.testing.assert_close(new[pos].attention.wq.weight, layers[src].attention.wq.weight)
    derived, spec2 = grow_by_strategy(toys.make_layers(8)[0], "solar_dus", depth=12)
    assert spec2["options"]["m"] == 2 and spec2["mapping"] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    _, spec3 = grow_by_strategy(toys.make_layers(8)[0], "solar_dus")
    assert spec3["options"]["m"] == 2  # default L // 4
    with pytest.raises(ValueError, match="depth=9 is not reachable"):
        grow_by_strategy(layers, "solar_dus", depth=9)
    with pytest.raises(ValueError, match="depth=6 disagrees with m=2"):
        grow_by_strategy(layers, "solar_dus", depth=6, m=2)
    with pytest.raises(ValueError, match=r"m=4 must be in \[0, L=4\)"):
        grow_by_strategy(layers, "solar_dus", m=4)


def test_unknown_strategy_and_options_are_named():
    layers, _ = toys.make_layers(2)
    with pytest.raises(
        ValueError, match=r"unknown growth strategy 'gstack'.*'interleave_copy', 'llama_pro', 'scalenet'"
    ):
        grow_by_strategy(layers, "gstack")
    with pytest.raises(
        TypeError, match=r"strategy 'solar_dus' got unknown options \['every'\]; it accepts \['m'\]"
    ):
        grow_by_strategy(layers, "solar_dus", every=2)
    with pytest.raises(ValueError, match="always uses mapping='stack'"):
        grow_by_strategy(layers, "stack_copy", mapping="interleave")
    # the signature's default mapping ("stack") means "not chosen" for fixed-order strategies
    _, spec = grow_by_strategy(layers, "interleave_copy", mapping="stack")
    assert spec["mapping"] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="derives its mapping from m/depth"):
        grow_by_strategy(layers, "solar_dus", mapping=[0, 1])


@pytest.mark.parametrize(
    "strategy,opts",
    [
        (
            "scalenet",
            {"mapping": "interleave", "adapter_rank": 3, "targets": ["wq", "w2"], "untie_norms": True},
        ),
        ("scalenet", {"depth": 5, "adapter_alpha": 4.0}),
        ("stack_copy", {}),
        ("llama_pro", {"every": 2, "freeze_original": True}),
        ("solar_dus", {"m": 1}),
    ],
)
def test_spec_rebuilds_the_same_structure_and_checkpoint_loads(strategy, opts):
    layers, pool = toys.make_layers(4, memory_at=(2,))
    new, spec = grow_by_strategy(layers, strategy, **opts)
    spec = json.loads(json.dumps(spec))  # what a checkpoint would store
    model = toys.Model(new, pool=pool)
    with torch.no_grad():  # perturb everything so that a fresh rebuild differs until loaded
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    want = model(X, ROPE)
    sd = unique_state_dict(model)

    fresh_layers, fresh_pool = toys.make_layers(4, memory_at=(2,), seed=123)
    fresh = toys.Model(rebuild(fresh_layers, spec), pool=fresh_pool)
    assert list(dict(fresh.named_parameters())) == list(dict(model.named_parameters()))
    assert not torch.allclose(fresh(X, ROPE), want)
    load_unique_state_dict(fresh, sd)
    torch.testing.assert_close(fresh(X, ROPE), want, rtol=0, atol=0)
    # ties come back as ties, untied tensors stay untied
    names = dict(model.named_parameters(remove_duplicate=False))
    fresh_names = dict(fresh.named_parameters(remove_duplicate=False))
    for a in names:
        for b in ("layers.0.attention.wq.weight", "layers.1.attention_norm.weight"):
            assert (names[a] is names[b]) == (fresh_names[a] is fresh_names[b]), (a, b)
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in model.parameters()]


def test_rebuild_checks_base_depth_and_format():
    layers, _ = toys.make_layers(3)
    _, spec = grow_by_strategy(layers, "scalenet")
    with pytest.raises(ValueError, match="grown from 3 base blocks but layers has 2"):
        rebuild(toys.make_layers(2)[0], spec)
    with pytest.raises(ValueError, match="not a scalenet growth spec"):
        rebuild(layers, {"strategy": "scalenet"})


def test_registering_a_strategy_is_one_function():
    @register_strategy("reverse_copy_test")
    def reverse(blocks, *, depth, mapping, adapter_rank, targets, shared_objects):
        src = list(range(len(blocks) - 1, -1, -1)) + list(range(len(blocks)))
        return nn.ModuleList([blocks[s] for s in src]), {}, src

    try:
        layers, _ = toys.make_layers(2)
        new, spec = grow_by_strategy(layers, "reverse_copy_test")
        assert spec["mapping"] == [1, 0, 0, 1] and new[0] is layers[1]
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("reverse_copy_test")(reverse)
    finally:
        STRATEGIES.pop("reverse_copy_test")
