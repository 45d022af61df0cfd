"""Typed configs: dataclass schemas filled by OmegaConf from `config=path.yaml` plus `a.b=c` overrides.

Precedence: dataclass defaults <- YAML (and the files it names under `_base_`) <- command line.
Unknown keys and wrong types fail with one line naming the key, where it came from, and what
was expected. The resolved config is saved with every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.errors import CliExit, ConfigError
from launch.model import ModelConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: config, metrics.jsonl, checkpoints/ (re-running resumes it)
    seed: int = 0  # seed of initialisation, data order and sampling
    name: str | None = None  # label for logs and W&B (None: the run directory's name)


@dataclass
class MemoryConfig:
    layers: list[int] = field(default_factory=list)  # block indices whose FFN becomes a memory layer
    n_keys: int = 128  # sub-keys per half: n_keys**2 value slots
    heads: int = 4  # query heads per memory layer
    k_dim: int = 128  # key dim (two halves of k_dim/2)
    knn: int = 32  # slots read per head (top-K)
    v_dim: int | None = None  # None: model.dim
    gated: bool = True  # Memory+ silu input gate
    qk_norm: bool = False  # RMS-normalise queries and keys before scoring
    query_batchnorm: bool = False  # batch-normalise query features over the batch's tokens (Lample et al. 2019; synced across data-parallel ranks, running estimates in eval)
    shared: bool = True  # one value pool for every memory layer (False: one per layer)
    value_lr: float = 1e-3  # learning rate of the value table (its own optimizer group)
    value_weight_decay: float = 0.0  # weight decay of the value table
    value_optimizer: str = "adamw"  # adamw (dense, the paper's recipe) | row_sparse_adam (same result, touches read rows only) | rowwise_adam (one second moment per row)
    lookup_impl: str = "auto"  # auto | torch | triton | cpu
    value_dtype: str = "fp32"  # fp32 | bf16: storage of the value table (reads accumulate in fp32; row_sparse_adam/rowwise_adam keep moments in this dtype)
    value_rounding: str = "nearest"  # nearest | stochastic: how row_sparse_adam/rowwise_adam round bf16 stores of values and moments (stochastic keeps updates below half a bf16 step in expectation)
    fused_value_update: bool = True  # row_sparse_adam/rowwise_adam: step inside the lookup backward where that is exact (no clipping of the values: optim.grad_clip=0 or memory.clip_values=false; grad_accum=1, 1 process, one layer per pool)
    clip_values: bool = True  # count the value tables in optim.grad_clip's global norm (false: values are neither counted nor scaled, as FBGEMM TBE does; lets the fused update run with clipping on)


@dataclass
class GrowConfig:
    """How this model was grown (scalenet). Empty `strategy`: not grown."""

    strategy: str | None = None  # scalenet | stack_copy | interleave_copy | llama_pro | solar_dus
    base_layers: int | None = None  # depth before growing (model.n_layers is the grown depth)
    depth: int | None = None  # grown depth (None: 2 x base)
    mapping: Any = "stack"  # stack | interleave | explicit list of source indices
    adapter_rank: int = 8  # rank of each position's low-rank adapter (0: pure sharing)
    targets: list[str] | None = None  # name globs of the Linears that get adapters (None: all)
    untie_norms: bool = False  # scalenet: per-position norm weights instead of shared ones
    adapter_alpha: float | None = None  # scalenet: adapter scale alpha / rank (None: scale 1)
    every: int | None = None  # llama_pro: insert a copy after every k-th block (None: L / (depth - L))
    zero_init: list[str] | None = None  # llama_pro: zeroed output projections of inserted copies
    freeze_original: bool = False  # llama_pro: only the inserted copies train (kept in `spec`)
    m: int | None = None  # solar_dus: blocks dropped at the seam (depth = 2L - 2m)
    spec: Any = None  # the exact structure recorded by scalenet (rebuilds the tie pattern on load)


@dataclass
class DataConfig:
    train: str = "shakespeare"  # "shakespeare" (bundled) or a local file / directory / glob
    val: str | None = "shakespeare"  # None: no validation
    format: str = "auto"  # auto | text | jsonl | parquet
    text_field: str = "text"  # JSONL/Parquet field holding the text
    tokenizer: str | None = None  # path to a sentencepiece .model; None: train one with the run
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 32  # GLOBAL batch in sequences per optimizer step
    val_sequences: int = 128  # validation sequences evaluated each time
    # Extra training sources mixed in: [{path: facts/train.txt, ratio: 0.2}, ...] (optional per
    # entry: format, text_field). `ratio` is the fraction of training SEQUENCES drawn from that
    # source (small sources repeat); data.train gets 1 - sum(ratios). Validation uses data.val only.
    mix: list[Any] = field(default_factory=list)
    cache_dir: str | None = None  # where sources that are not shard directories are tokenized to; None: RUN_DIR/data_cache
    tokenize_workers: int = 0  # processes that tokenize a source not yet in the cache; 0: one per CPU core
    encoding_errors: str = "strict"  # strict: refuse non-UTF-8 text (file and byte offset) | replace: decode with U+FFFD


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine | constant | linear
    weight_decay: float = 0.1  # matrices only; norms, biases and embeddings are not decayed
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainConfig:
    steps: int = 1000  # total optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # steps between metrics records (and plain progress lines)
    ckpt_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    val_every: int = 200  # steps between validation losses (0: never)
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # tqdm bar on a terminal; false (or stdout not a terminal): a plain line every log_every steps
    tensorboard: bool = False  # also write TensorBoard events to RUN/tensorboard (extra [tensorboard])
    init_from: str | None = None  # checkpoint to start from (weights only; fresh optimizer)
    reset_data: bool = False  # with init_from: restart the data stream instead of continuing it
    async_checkpoint: bool = False  # write checkpoints in a background thread (DCP async_save); training continues
    activation_checkpoint: str = "none"  # none | full | selective (every other block): recompute activations in backward
    final_val_sequences: int = -1  # sequences in the end-of-training validation: -1 the whole split, 0 none, N the first N
    wandb: str | None = None  # W&B project to log to as well (extra [wandb]; WANDB_MODE=offline: no network)


@dataclass
class ParallelConfig:
    data: str = "ddp"  # ddp | fsdp
    memory: int = 1  # memory-parallel group size (values sharded by embedding dim)
    tensor: int = 1  # tensor-parallel size (attention heads and FFN units split)
    backend: str = "auto"  # auto | gloo | nccl


@dataclass
class EvalConfig:
    every: int = 0  # run `tasks` every N training steps (0: never)
    tasks: list[str] = field(default_factory=list)  # FORMAT:PATH[?shots=PATH][&name=NAME] or a built-in name (shakespeare)
    limit: int | None = None  # rows per task (windows for text); None: all
    shots: int = 0  # few-shot examples before each prompt
    batch_size: int = 16  # sequences per forward
    max_new_tokens: int = 32  # generative tasks: answer length limit
    sample_prompt: str = "ROMEO.\n"  # prompt of the printed sample generation
    sample_tokens: int = 64  # tokens in the printed sample (0: no sample)
    sample_temperature: float = 0.0  # 0: greedy sample; > 0: sampled with eval.seed
    sample_top_k: int | None = None  # sampled sample: keep the top-k tokens (None: all)
    seed: int = 0  # seed of the sampled sample
    text_stride: int = 0  # perplexity windows: 0 = non-overlapping; S < max_seq_len slides by S tokens


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # where the run lives
    model: ModelConfig = field(default_factory=ModelConfig)  # the Llama-style decoder
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # product-key memory layers (empty layers: dense)
    grow: GrowConfig = field(default_factory=GrowConfig)  # ScaleNet growth (set by launch.grow)
    data: DataConfig = field(default_factory=DataConfig)  # training and validation text
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the LR schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop, logging, checkpoints
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # distributed layout
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation tasks (launch.eval, and during training)


# ---------------------------------------------------------------------------------------------
# Loading


def _schema_fields(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def check_keys(data: Any, schema: type, source: str, prefix: str = "") -> None:
    """Fail on the first key of `data` the dataclass `schema` does not declare."""
    if not isinstance(data, dict | DictConfig):
        return
    fields = _schema_fields(schema)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            raise ConfigError(f"unknown key '{full}' in {source}; valid keys {where}: {', '.join(fields)}")
        sub = fields[key]
        if dataclasses.is_dataclass(sub):
            if value is not None and not isinstance(value, dict | DictConfig):
                raise ConfigError(f"'{full}' in {source} must be a mapping of {', '.join(_schema_fields(sub))}")
            check_keys(value, sub, source, prefix=f"{full}.")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load a YAML file, first merging the files it lists under `_base_` (paths relative to it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through _base_")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry line/column in their message
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(node).__name__}")
    bases = node.pop("_base_", None)
    if bases is None:
        return node
    merged = OmegaConf.create()
    for base in [bases] if isinstance(bases, str) else list(bases):
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(base), (*seen, path.resolve())))
    return OmegaConf.merge(merged, node)


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' in {source}: {msg}") from None


HELP_FLAGS = ("--help", "-h", "help")
PRINT_FLAGS = ("--cfg", "--print-config", "print_config=true", "print_config=True", "print_config=1")


def split_cli_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(argv without them, --help asked, print_config asked)."""
    rest = [a for a in argv if a not in HELP_FLAGS + PRINT_FLAGS and not a.startswith("print_config=")]
    return rest, any(a in HELP_FLAGS for a in argv), any(a in PRINT_FLAGS for a in argv)


def parse_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into the `config=` path and `key=value` overrides."""
    config_path, overrides = None, []
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"expected key=value arguments (e.g. config=configs/tiny.yaml train.steps=10), got {arg!r}")
        key, value = arg.split("=", 1)
        if key == "config":
            config_path = value
        else:
            overrides.append(f"{key}={value}")
    return config_path, overrides


def load_config(
    argv: list[str], schema: type = Config, base: Any = None, *, require_config: bool = False, usage: str | None = None
) -> Any:
    """Build a `schema` instance from defaults, an optional `base` (dict/DictConfig, e.g. the config
    stored in a checkpoint), `config=FILE` and dotted overrides in `argv`.

    On the command line, `--help`/`-h` prints `usage` and every key of `schema` (`launch.cli_help`)
    and `print_config=true`/`--cfg` prints the resolved config, both exiting 0 through `CliExit`;
    with `require_config`, no `config=` prints the usage and exits 2."""
    from launch import cli_help

    argv, wants_help, wants_print = split_cli_flags(argv)
    if wants_help:
        raise CliExit(cli_help.help_text(schema, usage))
    config_path, overrides = parse_overrides(argv)
    if require_config and not config_path:
        raise CliExit(f"{usage or cli_help.usage_line()}\nerror: config=FILE is required (--help lists every key)", 2)
    cfg = OmegaConf.structured(schema)
    if base is not None:
        check_keys(base, schema, "the checkpoint's config")
        cfg = _merge(cfg, base, "the checkpoint's config")
    if config_path:
        node = _read_yaml(Path(config_path))
        check_keys(node, schema, config_path)
        cfg = _merge(cfg, node, config_path)
    if overrides:
        try:
            cli = OmegaConf.from_dotlist(overrides)
        except Exception as e:
            raise ConfigError(f"cannot parse command-line overrides: {str(e).splitlines()[0]}") from None
        check_keys(cli, schema, "the command line")
        cfg = _merge(cfg, cli, "the command line")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {str(e).splitlines()[0]}") from None
    if wants_print:
        raise CliExit(to_yaml(obj))
    return obj


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_container(data: dict, schema: type = Config) -> Any:
    return load_config([], schema, base=data)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _range(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False, optional: bool = False):
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
    if not cfg.run.dir:
        raise ConfigError("run.dir is empty: expected the run directory")
    m = cfg.memory
    if m.value_rounding == "stochastic" and (m.value_dtype != "bf16" or m.value_optimizer == "adamw"):
        raise ConfigError(
            f"memory.value_rounding=stochastic rounds the bf16 stores of the row-sparse value optimizers; it needs "
            f"memory.value_dtype=bf16 (got {m.value_dtype}) and memory.value_optimizer=row_sparse_adam or "
            f"rowwise_adam (got {m.value_optimizer})"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.data.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (global sequences per step) must be divisible by "
            f"train.grad_accum={cfg.train.grad_accum}"
        )


def plain(node: Any) -> Any:
    """An OmegaConf node as plain Python containers (anything else unchanged)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def config_from_file(path: str | Path, schema: type = Config) -> Any:
    """A saved, resolved config (a run's or a checkpoint's config.yaml) as a `schema` instance."""
    return from_container(plain(OmegaConf.load(path)), schema)
