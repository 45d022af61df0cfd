"""Compose a model from a config: the Llama decoder, memory layers in place of selected FFNs
(one shared value pool, or one per layer), and ScaleNet growth recorded in `grow.spec`."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from launch.config import Config, plain
from launch.models.llama import ModelConfig, Transformer
from launch.runtime.errors import ConfigError


def base_model_config(cfg: Config) -> ModelConfig:
    """The model config before growth (growth records the base depth)."""
    if cfg.grow.strategy and cfg.grow.base_layers:
        return dataclasses.replace(cfg.model, n_layers=cfg.grow.base_layers)
    return cfg.model


def _memory_factory(cfg: Config, n_layers: int):
    m = cfg.memory
    bad = [i for i in m.layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(
            f"memory.layers={list(m.layers)}: indices {bad} out of range for model.n_layers={n_layers}"
        )
    if len(set(m.layers)) != len(m.layers):
        raise ConfigError(f"memory.layers={list(m.layers)} lists a layer twice")
    from memlayers import MemoryPool, ProductKeyMemory

    v_dim = m.v_dim or cfg.model.dim
    pool_kwargs = dict(
        n_keys=m.n_keys,
        v_dim=v_dim,
        # Row-sparse value gradients feed the row-sparse optimizer; dense AdamW needs dense ones.
        sparse_grad=m.value_optimizer in ("row_sparse_adam", "rowwise_adam"),
        lookup_impl=m.lookup_impl,
        dtype=torch.bfloat16 if m.value_dtype == "bf16" else None,
    )
    try:
        pools = [MemoryPool(**pool_kwargs) for _ in range(1 if m.shared else len(m.layers))]
    except ValueError as e:
        raise ConfigError(f"memory: {e}") from None
    slot = {layer: (0 if m.shared else i) for i, layer in enumerate(m.layers)}

    def factory(layer_id: int, mcfg: ModelConfig) -> nn.Module | None:
        if layer_id not in slot:
            return None
        try:
            return ProductKeyMemory(
                dim=mcfg.dim,
                pool=pools[slot[layer_id]],
                heads=m.heads,
                k_dim=m.k_dim,
                knn=m.knn,
                gated=m.gated,
                qk_norm=m.qk_norm,
                query_batchnorm=m.query_batchnorm,
            )
        except ValueError as e:
            raise ConfigError(f"memory: {e}") from None

    return factory, pools


def build_model(cfg: Config) -> Transformer:
    """Build (uninitialised) the model `cfg` describes; call `init_weights()` or load weights next."""
    base_cfg = base_model_config(cfg)
    factory, pools = (None, [])
    if cfg.memory.layers:
        factory, pools = _memory_factory(cfg, base_cfg.n_layers)
    model = Transformer(base_cfg, factory)
    if pools:
        # The model is the pool's one registered owner: its values appear once in parameters()
        # and state_dict, however many layers read them.
        model.memory_pools = nn.ModuleList(pools)
    if cfg.grow.strategy:
        from scalenet import rebuild

        if cfg.grow.spec is None:
            raise ConfigError(
                "grow.strategy is set but grow.spec is empty: grown models come from launch.grow"
            )
        model.layers = rebuild(model.layers, plain(cfg.grow.spec))
        model.cfg = cfg.model
    if len(model.layers) != cfg.model.n_layers:
        raise ConfigError(
            f"model.n_layers={cfg.model.n_layers} but the built model has {len(model.layers)} blocks"
        )
    return model


def active_params(model: Transformer) -> int:
    """Parameters touched per token: everything except the value tables, plus the value rows each
    memory layer reads (heads × knn rows of v_dim)."""
    from launch.train.optim import memory_value_params

    total = model.num_params() - sum(p.numel() for p in memory_value_params(model))
    for m in model.modules():
        if hasattr(m, "pool") and hasattr(m, "knn") and hasattr(m, "heads"):
            total += m.heads * m.knn * m.pool.v_dim  # v_dim: the full width, also for a sharded pool
    return total
