"""Grow a checkpoint's depth: `python -m launch.grow checkpoint=CKPT out=DIR grow.strategy=NAME [grow.*=...]`.

The input is any checkpoint directory of ours (or a run directory: its latest checkpoint), including
one imported with `launch.convert from-hf`. The output DIR is itself a checkpoint directory:

    model.safetensors   grown weights; a block reused at several positions is stored once
    config.yaml         the source config with model.n_layers = grown depth, the full `grow` section
                        (strategy, base_layers, options, spec), train.init_from = DIR and a fresh run.dir
    tokenizer.model     copied from the source
    trainer_state.json  step 0 and the source's data-stream position (no optimizer.pt: a fresh optimizer)
    growth.json         the summary printed below (parameter counts, mapping, source)

so `python -m launch.train config=DIR/config.yaml train.steps=N` continues training it and
`python -m launch.eval checkpoint=DIR` evaluates it. A grown source is merged first (adapters folded,
ties unshared) and the merged model grown again.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch.checkpoint.checkpointer import write_model_checkpoint
from launch.checkpoint.load import LoadedCheckpoint, load_checkpoint
from launch.checkpoint.paths import resolve_checkpoint
from launch.checkpoint.read import read_trainer_state
from launch.checkpoint.state import alias_map
from launch.config import Config, GrowConfig, load_config, to_yaml
from launch.models.llama import Transformer
from launch.runtime.errors import ConfigError, UserError, run_cli
from launch.runtime.outputs import check_output_dir

# GrowConfig fields that are strategy keyword options (passed only to strategies that accept them).
STRATEGY_OPTIONS = ("untie_norms", "adapter_alpha", "every", "zero_init", "freeze_original", "m")
_RECORDED = ("base_layers", "spec")  # written by launch.grow, never given by the user
COMMAND = "launch.grow"  # recorded in launch.outputs.MARKER: overwrite=true replaces only such outputs


@dataclass
class GrowArgs:
    checkpoint: str = ""  # checkpoint dir, or a run dir (its latest checkpoint)
    out: str = ""  # new checkpoint directory
    overwrite: bool = False  # replace a non-empty `out`
    run_dir: str | None = None  # run.dir recorded for continued training (None: OUT's sibling OUT_run)
    seed: int | None = None  # RNG seed for new adapter weights (None: the source's run.seed)
    verify: bool = True  # reload the written checkpoint and check weights, ties and logits
    grow: GrowConfig = field(default_factory=GrowConfig)


@dataclass
class GrowthSummary:
    strategy: str
    base_layers: int
    depth: int
    mapping: list[int]
    base_params: int
    grown_params: int
    added_params: int
    overhead_pct: float  # added params as % of the base model's (embeddings included)
    adapter_params: int
    trainable_params: int
    stored_tensors: int
    aliases: int
    source: str
    out: str
    run_dir: str

    def lines(self) -> list[str]:
        return [
            f"grew {self.source} ({self.base_layers} layers) -> {self.out} ({self.depth} layers) with {self.strategy}",
            f"  mapping        {self.mapping}",
            f"  base params    {self.base_params:,}",
            f"  grown params   {self.grown_params:,} (trainable {self.trainable_params:,})",
            f"  overhead       +{self.added_params:,} = {self.overhead_pct:.2f}% of base "
            f"(adapters {self.adapter_params:,})",
            f"  stored         {self.stored_tensors} tensors, {self.aliases} shared names stored once",
            f"continue: python -m launch.train config={self.out}/config.yaml train.steps=N  (run dir {self.run_dir})",
            f"evaluate: python -m launch.eval checkpoint={self.out} tasks=[shakespeare]",
        ]


# ---------------------------------------------------------------------------------------------
# Argument checks


def _field_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def strategy_options(g: GrowConfig) -> dict[str, Any]:
    """The strategy keyword options `g` sets; options the strategy does not take must stay at their default."""
    from scalenet import STRATEGIES

    if not g.strategy:
        raise ConfigError(f"grow.strategy= is required; valid strategies: {', '.join(sorted(STRATEGIES))}")
    if g.strategy not in STRATEGIES:
        raise ConfigError(
            f"grow.strategy={g.strategy!r} is not a growth strategy; valid strategies: {', '.join(sorted(STRATEGIES))}"
        )
    defaults = _field_defaults(GrowConfig)
    for name in _RECORDED:
        if getattr(g, name) != defaults[name]:
            raise ConfigError(
                f"grow.{name} is recorded by launch.grow from the source checkpoint; do not set it"
            )
    accepted = {
        p.name
        for p in inspect.signature(STRATEGIES[g.strategy]).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    opts = {}
    for name in STRATEGY_OPTIONS:
        value = getattr(g, name)
        if name in accepted:
            if value != defaults[name]:
                opts[name] = list(value) if isinstance(value, list | tuple) else value
        elif value != defaults[name]:
            users = sorted(s for s, fn in STRATEGIES.items() if name in inspect.signature(fn).parameters)
            raise ConfigError(
                f"grow.{name}={value!r} is an option of strategy {', '.join(users) or '(none)'}, "
                f"not of grow.strategy={g.strategy}"
            )
    return opts


# ---------------------------------------------------------------------------------------------
# Growing


def plain_base(src: LoadedCheckpoint) -> tuple[Transformer, Config, dict[str, Any] | None]:
    """The source as a plain (ungrown) model and config; a grown source is merged first.

    Returns (model, config without a grow section, the merged growth's spec or None)."""
    model, cfg = src.model, src.config
    if not cfg.grow.strategy:
        return model, cfg, None
    if cfg.memory.layers:
        raise UserError(
            f"{src.path} is a grown model with memory layers; growing it again is not supported "
            "(memory.layers index the base blocks): grow the original base checkpoint instead"
        )
    from scalenet import merge

    previous = cfg.grow.spec
    model.layers = merge(model.layers)  # adapters folded, shared weights copied per position
    model.requires_grad_(True)  # a frozen llama_pro original is an ordinary block from here on
    plain_cfg = dataclasses.replace(cfg, grow=GrowConfig())
    return model, plain_cfg, previous


def grown_config(base_cfg: Config, g: GrowConfig, spec: dict[str, Any], out: Path, run_dir: Path) -> Config:
    """The source config turned into the grown model's: depth, grow section, and where training continues."""
    grow_section = dataclasses.replace(g, base_layers=base_cfg.model.n_layers, depth=spec["depth"], spec=spec)
    return dataclasses.replace(
        base_cfg,
        model=dataclasses.replace(base_cfg.model, n_layers=spec["depth"]),
        grow=grow_section,
        run=dataclasses.replace(base_cfg.run, dir=str(run_dir)),
        train=dataclasses.replace(base_cfg.train, init_from=str(out)),
    )


def grow_model(model: Transformer, g: GrowConfig, seed: int) -> dict[str, Any]:
    """Grow `model.layers` in place (the source blocks' parameters are reused); return the spec."""
    from scalenet import grow_by_strategy

    opts = strategy_options(g)
    torch.manual_seed(seed)  # adapter A matrices are random: make the grown checkpoint reproducible
    mapping = list(g.mapping) if isinstance(g.mapping, list | tuple) else g.mapping
    try:
        new_layers, spec = grow_by_strategy(
            model.layers,
            g.strategy,
            depth=g.depth,
            mapping=mapping,
            adapter_rank=g.adapter_rank,
            targets=list(g.targets) if g.targets is not None else None,
            **opts,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"grow: {e}") from None
    base = len(model.layers)
    if spec["depth"] <= base:
        # Any strategy can be asked for a depth (or an explicit mapping, or solar_dus's m) that keeps
        # or drops blocks; that is pruning, not growth, and was once reported as "-30% growth".
        asked = (
            f"grow.depth={g.depth}"
            if g.depth is not None
            else f"grow.strategy={g.strategy} with these options"
        )
        raise ConfigError(
            f"{asked} gives {spec['depth']} layers, not more than the source's {base}: launch.grow only deepens "
            f"a model (pass grow.depth > {base}, or leave it unset for {2 * base})"
        )
    model.layers = new_layers
    model.cfg = dataclasses.replace(model.cfg, n_layers=spec["depth"])
    return spec


def _trainable(model: nn.Module) -> int:
    seen: set[int] = set()
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad and not (id(p) in seen or seen.add(id(p)))
    )


def _write(
    out: Path, model: Transformer, cfg: Config, src: LoadedCheckpoint, summary: dict, overwrite: bool
) -> None:
    """Write the checkpoint (launch.checkpoint's format, launch.runtime.outputs' rules: temp dir, manifest, rename)."""
    source_state = read_trainer_state(src.path)
    state = {
        "step": 0,
        "tokens": 0,
        # train.init_from continues the stream here unless train.reset_data=true
        "data": source_state.get("data"),
        "world_size": source_state.get("world_size", 1),
        "grown_from": {"checkpoint": str(src.path), "step": src.step, "tokens": source_state.get("tokens")},
    }
    extra = {"growth.json": json.dumps(summary, indent=2)}
    write_model_checkpoint(
        out,
        model,
        state,
        to_yaml(cfg),
        src.tokenizer.path,
        extra,
        command=COMMAND,
        overwrite=overwrite,
        sources=(src.path,),
    )


def verify_checkpoint(out: Path, model: Transformer) -> None:
    """Reload `out` as every consumer does and check it is the model just grown: same tensors, same
    tie structure (one Parameter object per shared weight), same logits."""
    loaded = load_checkpoint(out).model
    mine = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(loaded.named_parameters(remove_duplicate=False))
    if mine.keys() != theirs.keys():
        raise RuntimeError(
            f"reloaded {out} has different parameter names: {sorted(mine.keys() ^ theirs.keys())[:4]}"
        )
    first: dict[int, str] = {}
    for name, p in mine.items():
        if not torch.equal(p, theirs[name]) or p.requires_grad != theirs[name].requires_grad:
            raise RuntimeError(f"reloaded {out}: parameter {name} differs from the grown model")
        if id(p) in first and theirs[first[id(p)]] is not theirs[name]:
            raise RuntimeError(f"reloaded {out}: {name} is no longer tied to {first[id(p)]}")
        first.setdefault(id(p), name)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, min(16, model.cfg.max_seq_len)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if not torch.allclose(model(tokens), loaded(tokens), atol=1e-5, rtol=1e-5):
            raise RuntimeError(f"reloaded {out} computes different logits from the grown model")
    model.train(was_training)


def grow_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    grow: GrowConfig,
    *,
    overwrite: bool = False,
    run_dir: str | Path | None = None,
    seed: int | None = None,
    verify: bool = True,
) -> GrowthSummary:
    """Grow the model of `checkpoint` as `grow` describes and write it to `out` as a new checkpoint."""
    strategy_options(grow)  # bad options fail before anything is loaded
    if not str(out):
        raise ConfigError("out= is required (the new checkpoint directory)")
    source = resolve_checkpoint(checkpoint)
    out = check_output_dir(out, command=COMMAND, overwrite=overwrite, sources=(checkpoint, source))
    run_dir = Path(run_dir).absolute() if run_dir else out.with_name(out.name + "_run")

    src = load_checkpoint(checkpoint)  # re-resolved if the run prunes `source` meanwhile
    model, base_cfg, previous_spec = plain_base(src)
    base_params = model.num_params()
    model.train()
    spec = grow_model(model, grow, src.config.run.seed if seed is None else seed)
    cfg = grown_config(base_cfg, grow, spec, out, run_dir)

    from scalenet import adapter_parameters

    aliases = alias_map(model)
    grown_params = model.num_params()
    summary = GrowthSummary(
        strategy=grow.strategy,
        base_layers=spec["base_depth"],
        depth=spec["depth"],
        mapping=list(spec["mapping"]),
        base_params=base_params,
        grown_params=grown_params,
        added_params=grown_params - base_params,
        overhead_pct=100.0 * (grown_params - base_params) / base_params,
        adapter_params=sum(p.numel() for p in adapter_parameters(model.layers)),
        trainable_params=_trainable(model),
        stored_tensors=len(model.state_dict()) - len(aliases),
        aliases=len(aliases),
        source=str(source),
        out=str(out),
        run_dir=str(run_dir),
    )
    record = dataclasses.asdict(summary) | {"spec": spec, "merged_source_spec": previous_spec}
    _write(out, model, cfg, src, record, overwrite)
    if verify:
        verify_checkpoint(out, model)
    return summary


def main(argv: list[str]) -> int:
    """python -m launch.grow checkpoint=CKPT out=DIR grow.strategy=scalenet [grow.depth=.. grow.mapping=..
    grow.adapter_rank=.. grow.targets=[..] grow.untie_norms=.. grow.every=.. grow.freeze_original=.. grow.m=..]
    [overwrite=true] [run_dir=DIR] [seed=N]"""
    args = load_config(argv, GrowArgs)
    if not args.checkpoint:
        raise ConfigError("checkpoint= is required (a checkpoint directory or a run directory)")
    summary = grow_checkpoint(
        args.checkpoint,
        args.out,
        args.grow,
        overwrite=args.overwrite,
        run_dir=args.run_dir,
        seed=args.seed,
        verify=args.verify,
    )
    print("\n".join(summary.lines()), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
