"""Named parameter groups (built here and only here), optimizers and the learning-rate schedule.

Groups:
  decay          2-D weight matrices of linear layers (and adapters): AdamW weight decay
  no_decay       norms, biases, embeddings, memory keys
  memory_values  the shared value pools: their own learning rate (`memory.value_lr`) and decay,
                 and their own row-sparse optimizer (the default; `memory.value_optimizer=adamw`
                 puts them in the main AdamW instead)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from launch.config import Config


def memory_value_params(model: nn.Module) -> list[nn.Parameter]:
    """Every memory value table of `model`, once each (shared pools included)."""
    from memlayers.shard_layout import MemoryShardLayout

    return MemoryShardLayout(model).values()


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    values = {id(p) for p in memory_value_params(model)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "memory_values": []}
    seen: set[int] = set()
    for p in model.parameters():  # deduplicated: tied and shared tensors once
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in values:
            groups["memory_values"].append(p)
        elif p.ndim == 2 and id(p) not in embeddings:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    return groups


def build_optimizers(model: nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    """The main AdamW over every group, or AdamW plus a row-sparse Adam that owns the values."""
    o, mem = cfg.optim, cfg.memory
    groups = param_groups(model)
    adamw_groups = [
        {"name": "decay", "params": groups["decay"], "lr": o.lr, "weight_decay": o.weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": o.lr, "weight_decay": 0.0},
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if groups["memory_values"]:
        if mem.value_optimizer in ("row_sparse_adam", "rowwise_adam"):
            from memlayers import MemoryPool
            from memlayers.optim import RowSparseAdam, RowwiseAdam, flush_on_state_dict

            cls = RowSparseAdam if mem.value_optimizer == "row_sparse_adam" else RowwiseAdam
            fused = mem.fused_value_update and fused_update_is_exact(model, cfg)
            value_opt = cls(
                [{"name": "memory_values", "params": groups["memory_values"], "lr": mem.value_lr}],
                lr=mem.value_lr,
                betas=(o.beta1, o.beta2),
                eps=o.eps,
                weight_decay=mem.value_weight_decay,
                fused=fused,
                deferred=fused and not fused_update_in_backward(model, cfg),
                rounding=mem.value_rounding,
                rounding_seed=cfg.run.seed,
            )
            # Its moments (twice the table) now, not inside the first timed step (a resume loads into them).
            value_opt.init_state()
            # Rows nobody read are behind until flushed: every state_dict of a pool (checkpoint,
            # export) catches them up first, so saved values are dense AdamW's.
            for m in model.modules():
                if isinstance(m, MemoryPool):
                    flush_on_state_dict(m, value_opt)
            optimizers.append(value_opt)
        else:
            adamw_groups.append(
                {
                    "name": "memory_values",
                    "params": groups["memory_values"],
                    "lr": mem.value_lr,
                    "weight_decay": mem.value_weight_decay,
                }
            )
    adamw_groups = [g for g in adamw_groups if g["params"]]
    # One foreach kernel cannot mix plain tensors and DTensors, or DTensors on different meshes
    # (tensor parallel without FSDP; TP weights on ("dp","tp") beside FSDP ones on "dp").
    meshes = {id(getattr(p, "device_mesh", None)) for g in adamw_groups for p in g["params"]}
    foreach = None if len(meshes) <= 1 else False
    optimizers.insert(
        0, torch.optim.AdamW(adamw_groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=foreach)
    )
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return optimizers


def reset_base_lrs(optimizers: list[torch.optim.Optimizer], cfg: Config) -> None:
    """Base LRs come from this run's config, not from a loaded optimizer state."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = cfg.memory.value_lr if g.get("name") == "memory_values" else cfg.optim.lr


def fused_update_is_exact(model: nn.Module, cfg: Config) -> bool:
    """Whether the row-sparse value update can be fused (the lookup's backward hands the value gradient
    to the optimizer; no gradient rows are written to `.grad`) with the unfused result: on one process.
    Replicated or column-sharded values on several ranks need their gradients averaged or summed
    across ranks first, so they take the unfused path. Where the fused update runs is
    `fused_update_in_backward`: inside the backward, or deferred to the optimizer step, which keeps
    global-norm clipping over the values (the paper's recipe), gradient accumulation and several
    memory layers per pool exact."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def fused_update_in_backward(model: nn.Module, cfg: Config) -> bool:
    """Whether the fused value update can run inside the lookup's backward (one pass: the fastest):
    each table read once per step (one memory layer per pool, no gradient accumulation) and no
    clipping of the values (optim.grad_clip=0, or memory.clip_values=false to leave them out of the
    global norm, which is not known until every gradient exists). Otherwise it is deferred: the
    backward keeps the lookup's inputs, the clip measures the value gradient's norm from them, and the
    optimizer step applies the update scaled by the clip coefficient."""
    if (cfg.optim.grad_clip > 0 and cfg.memory.clip_values) or cfg.train.grad_accum != 1:
        return False
    readers: dict[int, int] = {}
    for m in model.modules():
        pool = getattr(m, "pool", None)
        if pool is not None and hasattr(pool, "values"):
            readers[id(pool)] = readers.get(id(pool), 0) + 1
    return bool(readers) and all(n == 1 for n in readers.values())


def checkpoint_value_optimizer(ckpt: Path) -> str | None:
    """memory.value_optimizer of the run that wrote `ckpt` (its config.yaml), or None when unknown or
    the run had no memory layers. Plain YAML, like `launch.checkpoint.read.checkpoint_steps`."""
    import yaml

    try:
        memory = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("memory") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(memory, dict) or not memory.get("layers"):
        return None
    name = memory.get("value_optimizer")
    return name if isinstance(name, str) else None


def keep_value_optimizer(cfg: Config, ckpt: Path) -> tuple[Config, str | None]:
    """A resumed run keeps the value optimizer its checkpoint was written with: the optimizer state
    follows it (`adamw` keeps the values' moments in the main AdamW; the row-sparse optimizers are an
    optimizer of their own, with per-row steps), so the state cannot load into another one. A run begun
    with `adamw` (the default before row_sparse_adam) resumes with `adamw`. Returns (the config to
    resume with, a line saying what changed, or None)."""
    saved = checkpoint_value_optimizer(ckpt)
    asked = cfg.memory.value_optimizer
    if saved is None or saved == asked or not cfg.memory.layers:
        return cfg, None
    from launch.config import validate

    kept = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, value_optimizer=saved))
    validate(kept)
    return kept, (
        f"memory.value_optimizer={saved} kept on resume: {ckpt} was written with it, and its optimizer state "
        f"would not load into {asked} (this config's); for {asked} start a fresh run, or one with "
        f"train.init_from={ckpt} (its weights, a fresh optimizer)"
    )


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup over optim.warmup_steps, then cosine/linear decay to optim.min_lr_ratio (or constant)."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps > 0 and step <= o.warmup_steps:
        return step / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape


def schedule_change(old_steps: int | None, step: int, cfg: Config) -> str | None:
    """What a resume at `step` does to the LR schedule when train.steps differs from the
    checkpoint's run (`old_steps`): the schedule is a function of train.steps, so the LR jumps from
    the old curve to the new one at the resumed step. None when nothing changed."""
    new_steps = cfg.train.steps
    if old_steps is None or old_steps == new_steps:
        return None
    head = f"train.steps changed from {old_steps} (the checkpoint's run) to {new_steps}"
    if cfg.optim.schedule == "constant":
        return f"{head}; the constant LR schedule is unaffected"
    old_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=old_steps))
    before, after = cfg.optim.lr * lr_multiplier(step, old_cfg), cfg.optim.lr * lr_multiplier(step, cfg)
    how = "stretched" if new_steps > old_steps else "shortened"
    return (
        f"{head}: the {cfg.optim.schedule} LR schedule is {how} to {new_steps} steps "
        f"(LR at step {step}: {before:.2e} on the old schedule, {after:.2e} now)"
    )


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> float:
    """Scale every group's base LR; returns the main (non-value) LR for logging."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * multiplier
    return optimizers[0].param_groups[0]["lr"]
