"""Validating a loaded config: every numeric key within its range, and the cross-key rules (one line
naming the key and what was expected)."""

from __future__ import annotations

import math
from typing import Any

from launch.config.schema import Config, EvalConfig
from launch.runtime.errors import ConfigError, UserError
from launch.runtime.preemption import parse_signal


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _range(
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
    optional: bool = False,
):
    """A (test, description) pair for numeric keys: finite, within [low, high] (ends optionally open)."""
    lo, hi = "(" if open_low else "[", ")" if open_high else "]"
    if high == math.inf:
        text = f"a finite value {'>' if open_low else '>='} {low:g}"
    else:
        text = f"a finite value in {lo}{low:g}, {high:g}{hi}"

    def test(v: Any) -> bool:
        if v is None:
            return optional
        return _finite(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    return test, text + (" or null" if optional else "")


# Numeric keys a training config must hold within range (one line naming the key otherwise).
RANGES: dict[str, tuple] = {
    "model.multiple_of": _range(1),
    "model.ffn_dim": _range(1, optional=True),
    "model.n_kv_heads": _range(1, optional=True),
    "model.norm_eps": _range(0, open_low=True),
    "model.rope_theta": _range(0, open_low=True),
    "model.init_std": _range(0),
    "memory.n_keys": _range(1),
    "memory.heads": _range(1),
    "memory.k_dim": _range(2),
    "memory.knn": _range(1),
    "memory.v_dim": _range(1, optional=True),
    "memory.value_lr": _range(0, open_low=True),
    "memory.value_weight_decay": _range(0),
    "data.seq_len": _range(1),
    "data.batch_size": _range(1),
    "data.val_sequences": _range(1),
    "optim.lr": _range(0, open_low=True),
    "optim.min_lr_ratio": _range(0, 1),
    "optim.warmup_steps": _range(0),
    "optim.weight_decay": _range(0),
    "optim.beta1": _range(0, 1, open_high=True),
    "optim.beta2": _range(0, 1, open_high=True),
    "optim.eps": _range(0, open_low=True),
    "optim.grad_clip": _range(0),
    "train.steps": _range(1),
    "train.grad_accum": _range(1),
    "train.log_every": _range(1),
    "train.ckpt_every": _range(0),
    "train.keep_last": _range(1),
    "train.val_every": _range(0),
    "train.watchdog_s": _range(0),
    "parallel.memory": _range(1),
    "parallel.tensor": _range(1),
    "eval.every": _range(0),
}
# The eval section, shared by launch.train (eval.*) and launch.eval.
EVAL_RANGES: dict[str, tuple] = {
    "limit": _range(1, optional=True),
    "shots": _range(0),
    "batch_size": _range(1),
    "max_new_tokens": _range(1),
    "sample_tokens": _range(0),
    "sample_temperature": _range(0),
    "sample_top_k": _range(1, optional=True),
    "sample_top_p": _range(0, 1, open_low=True),
    "text_stride": _range(0),
}


def check_ranges(obj: Any, ranges: dict[str, tuple], prefix: str = "") -> None:
    """Raise ConfigError for the first dotted key of `obj` outside its range in `ranges`."""
    for key, (test, expected) in ranges.items():
        value = obj
        for part in key.split("."):
            value = getattr(value, part)
        if not test(value):
            raise ConfigError(f"{prefix}{key}={value} is out of range: expected {expected}")


def validate_eval(section: EvalConfig, prefix: str = "eval.") -> None:
    check_ranges(section, EVAL_RANGES, prefix)


def validate(cfg: Config) -> None:
    """Cross-field checks that a schema cannot express; raise ConfigError naming the keys."""
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    choices = {
        "train.dtype": (cfg.train.dtype, ("fp32", "bf16")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "parallel.data": (cfg.parallel.data, ("ddp", "fsdp")),
        "parallel.backend": (cfg.parallel.backend, ("auto", "gloo", "nccl")),
        "optim.schedule": (cfg.optim.schedule, ("cosine", "constant", "linear")),
        "data.format": (cfg.data.format, ("auto", "text", "jsonl", "parquet")),
        "memory.value_optimizer": (cfg.memory.value_optimizer, ("adamw", "row_sparse_adam", "rowwise_adam")),
        "memory.value_dtype": (cfg.memory.value_dtype, ("fp32", "bf16")),
        "memory.value_rounding": (cfg.memory.value_rounding, ("nearest", "stochastic")),
        "memory.lookup_impl": (cfg.memory.lookup_impl, ("auto", "torch", "triton", "cpu")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    check_ranges(cfg, RANGES)
    validate_eval(cfg.eval)
    for name in cfg.train.checkpoint_signals:
        try:
            parse_signal(name)
        except ValueError as e:
            raise ConfigError(f"train.checkpoint_signals: {e}") from None
    if not cfg.run.dir:
        raise ConfigError("run.dir is empty: expected the run directory")
    if "://" in cfg.run.dir:
        raise ConfigError(
            f"run.dir={cfg.run.dir}: the run directory must be a local or shared filesystem path (it holds the "
            "run lock, metrics.jsonl and logs, which need file locks and appends); put the checkpoints on "
            f"object storage with train.checkpoint_dir={cfg.run.dir} and a local run.dir"
        )
    if cfg.train.checkpoint_dir and "://" in cfg.train.checkpoint_dir:
        from launch.checkpoint.storage import check_url

        try:
            check_url(cfg.train.checkpoint_dir, "train.checkpoint_dir")
        except UserError as e:
            raise ConfigError(str(e)) from None
    m = cfg.memory
    if m.value_rounding == "stochastic" and (m.value_dtype != "bf16" or m.value_optimizer == "adamw"):
        raise ConfigError(
            f"memory.value_rounding=stochastic rounds the bf16 stores of the row-sparse value optimizers; it needs "
            f"memory.value_dtype=bf16 (got {m.value_dtype}) and memory.value_optimizer=row_sparse_adam or "
            f"rowwise_adam (got {m.value_optimizer})"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    if cfg.data.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (global sequences per step) must be divisible by "
            f"train.grad_accum={cfg.train.grad_accum}"
        )
