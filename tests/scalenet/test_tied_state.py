"""Ties across state_dict round trips and deduplicated (safetensors-ready) state dicts: scalenet.tied_state."""

from __future__ import annotations

import io

import pytest
import scalenet_test_toys as toys
import torch

import scalenet
from scalenet import adapters, count_params, grow, grow_by_strategy, rebuild
from scalenet.tied_state import alias_groups, load_unique_state_dict, unique_state_dict

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5))
ROPE = torch.rand(16, generator=torch.Generator().manual_seed(6)) + 0.5


def grown_model(seed: int = 0):
    layers, pool = toys.make_layers(3, memory_at=(1,), seed=seed)
    new, spec = grow_by_strategy(layers, "scalenet", adapter_rank=2)
    model = toys.Model(new, pool=pool)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, spec


def assert_tied(model):
    for i in range(3):
        a, b = model.layers[i], model.layers[i + 3]
        assert a.attention.wq.weight is b.attention.wq.weight
        assert a.ffn_norm.weight is b.ffn_norm.weight
        assert a.attention.wq.lora_A is not b.attention.wq.lora_A


def test_full_state_dict_round_trip_keeps_ties():
    model, spec = grown_model()
    sd = model.state_dict()
    assert "layers.0.attention.wq.weight" in sd and "layers.3.attention.wq.weight" in sd  # every alias listed
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh_layers, fresh_pool = toys.make_layers(3, memory_at=(1,), seed=9)
    fresh = toys.Model(rebuild(fresh_layers, spec), pool=fresh_pool)
    fresh.load_state_dict(loaded)
    assert_tied(fresh)
    torch.testing.assert_close(fresh(X, ROPE), model(X, ROPE), rtol=0, atol=0)
    # and the tie is live: an in-place update through one alias shows at the other
    with torch.no_grad():
        fresh.layers[0].attention.wq.weight.mul_(2)
    torch.testing.assert_close(fresh.layers[3].attention.wq.weight, 2 * model.layers[3].attention.wq.weight)


def test_unique_state_dict_keeps_one_name_per_storage():
    model, _ = grown_model()
    sd = unique_state_dict(model)
    assert "layers.0.attention.wq.weight" in sd and "layers.3.attention.wq.weight" not in sd
    assert "layers.3.attention.wq.lora_A" in sd  # adapters are per position
    ptrs = [t.data_ptr() for t in sd.values()]
    assert len(ptrs) == len(set(ptrs))
    assert sum(t.numel() for t in sd.values()) == count_params(model)
    assert len(alias_groups(model)) == len(sd)


def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, spec = grown_model()
    with pytest.raises(RuntimeError, match="share memory"):  # why the dedup exists
        save_file(model.state_dict(), str(tmp_path / "aliased.safetensors"))

    path = tmp_path / "grown.safetensors"
    save_file(unique_state_dict(model), str(path))
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(set(keys)) == len(alias_groups(model))
    assert sum(load_file(str(path))[k].numel() for k in keys) == count_params(model)

    fresh_layers, fresh_pool = toys.make_layers(3, memory_at=(1,), seed=7)
    fresh = toys.Model(rebuild(fresh_layers, spec), pool=fresh_pool)
    load_unique_state_dict(fresh, load_file(str(path)))
    assert_tied(fresh)
    torch.testing.assert_close(fresh(X, ROPE), model(X, ROPE), rtol=0, atol=0)


def test_load_unique_state_dict_errors():
    model, _ = grown_model()
    sd = unique_state_dict(model)
    del sd["layers.0.attention.wq.weight"]
    with pytest.raises(
        RuntimeError, match=r"missing 1 tensors: layers.0.attention.wq.weight \(or an alias: layers.3"
    ):
        load_unique_state_dict(model, sd)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    full["layers.3.attention.wq.weight"] += 1
    with pytest.raises(
        ValueError, match="tied names 'layers.0.attention.wq.weight' and 'layers.3.attention.wq.weight'"
    ):
        load_unique_state_dict(model, full)
    # any single alias is enough
    sd = unique_state_dict(model)
    sd["layers.3.attention.wq.weight"] = sd.pop("layers.0.attention.wq.weight")
    load_unique_state_dict(model, sd)
    assert_tied(model)


def test_adapters_of_a_grown_stack_are_in_the_checkpoint():
    layers, _ = toys.make_layers(2)
    new = grow(layers, adapter_rank=2)
    sd = unique_state_dict(new)
    assert sum(k.endswith("lora_B") for k in sd) == len(adapters(new)) == 4 * 7  # 4 positions x 7 linears


def test_old_checkpoint_module_still_imports():
    """scalenet.checkpoint is a shim onto scalenet.tied_state (its file IO moved to launch)."""
    from scalenet.checkpoint import alias_groups as old_alias_groups
    from scalenet.checkpoint import unique_state_dict as old_unique

    assert old_alias_groups is alias_groups and old_unique is unique_state_dict
    with pytest.raises(AttributeError, match="launch.checkpoint.tied_safetensors"):
        _ = scalenet.save_unique
