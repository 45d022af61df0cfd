"""launch.plan: per-rank bytes of a layout from a meta-device build (nothing allocated)."""

from __future__ import annotations

import pytest

from launch.config import load_config
from launch.distributed.plan import plan
from launch.models.build import build_model
from launch.plan import main
from launch.runtime.errors import ConfigError

from ..conftest import REPO  # noqa: TID252

MEMORY_CONFIGS = sorted((REPO / "configs" / "memory").glob("*.yaml"))


def cfg_of(path, *overrides):
    return load_config([f"config={path}", *overrides])


def test_7b_at_p8_counts_value_shards_exactly():
    cfg = cfg_of(REPO / "configs/memory/7b_memory.yaml", "parallel.memory=8", "parallel.data=fsdp")
    r = plan(cfg, 64)
    n_slots, dv = cfg.memory.n_keys**2, cfg.memory.v_dim or cfg.model.dim
    assert r["per_rank_bytes"]["params"]["values"] == n_slots * dv // 8 * 4
    assert r["per_rank_bytes"]["optimizer"]["values"] == 2 * n_slots * dv // 8 * 4
    # FSDP over 64 ranks: dense params per rank ~ 1/64 of the logical ones (dim-0 padding aside)
    dense = r["logical_params"]["dense"] * 4
    assert dense / 64 <= r["per_rank_bytes"]["params"]["dense"] <= dense / 64 * 1.05
    assert r["memory_comm_bytes_per_step"] > 0


@pytest.mark.parametrize("path", MEMORY_CONFIGS, ids=lambda p: p.stem)
def test_every_memory_config_plans(path):
    r = plan(cfg_of(path, "parallel.memory=1", "parallel.data=fsdp"), 8)
    assert r["per_rank_total_bytes"] > 0


def test_one_rank_plan_equals_the_allocated_model():
    cfg = cfg_of(REPO / "configs/memory/tiny_memory.yaml")
    r = plan(cfg, 1)
    model = build_model(cfg)
    values = {id(p) for pool in model.memory_pools for p in pool.parameters()}
    unique = dict.fromkeys(model.parameters())
    want_values = sum(p.numel() * 4 for p in unique if id(p) in values)
    want_dense = sum(p.numel() * 4 for p in unique if id(p) not in values)
    assert r["per_rank_bytes"]["params"] == {"values": want_values, "dense": want_dense}
    assert r["memory_comm_bytes_per_step"] == 0


def test_sharding_divides_per_rank_bytes():
    base = REPO / "configs/memory/tiny_memory.yaml"
    one = plan(cfg_of(base), 1)["per_rank_bytes"]
    four = plan(cfg_of(base, "parallel.memory=4", "parallel.data=fsdp"), 4)["per_rank_bytes"]
    assert four["params"]["values"] * 4 == one["params"]["values"]
    assert four["optimizer"]["values"] * 4 == one["optimizer"]["values"]
    assert four["params"]["dense"] < one["params"]["dense"] / 3


def test_bad_layouts_are_one_line(capsys):
    with pytest.raises(ConfigError, match="parallel.memory=3 must divide the world size 4"):
        main([f"config={REPO / 'configs/memory/tiny_memory.yaml'}", "parallel.memory=3", "world=4"])
    with pytest.raises(ConfigError, match="world must be a positive integer"):
        main([f"config={REPO / 'configs/memory/tiny_memory.yaml'}", "world=zero"])


def test_nothing_is_allocated():
    # 2048² × 512 fp32 values are 8 GiB: building them for real would move the peak RSS by that much
    import resource

    cfg = cfg_of(REPO / "configs/memory/tiny_memory.yaml", "memory.n_keys=2048", "memory.v_dim=512")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = plan(cfg, 1)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert r["per_rank_bytes"]["params"]["values"] == 2048 * 2048 * 512 * 4
    assert grown_kib < 512 * 1024
