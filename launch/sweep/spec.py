"""Sweep files: a base config plus a grid and/or a list of overrides, expanded into named runs.

```yaml
name: memory_placement            # default: the file's stem
base: ../memory/tiny_memory.yaml  # relative to this file
out: runs/sweeps/memory_placement # each run trains in OUT/RUN_NAME
overrides: {train.steps: 300}     # applied to every run
grid:                             # cartesian product of these values
  memory.layers: [[1], [0, 1]]
  memory.shared: [true, false]
runs:                             # explicit override sets (each times the grid when both are given)
  - {name: dense, memory.layers: []}
  - {memory.gated: false}
  - {name: scalenet, grow: {from: base, strategy: scalenet, depth: 4}}   # grow another run first
  - {name: scratch, grid: {optim.lr: [1e-3, 3e-3]}}   # this entry only: one run per value
  - {name: noisy_arm, seeds: [0, 1, 2, 3, 4]}   # this entry's own seeds replace `seeds`
seeds: [0, 1, 2]                  # every run once per seed (run.seed), named RUN_seed-S
report: {plot: values, tune: [optim.lr]}  # how `collect` summarises (see ReportSettings)
eval: {tasks: ["facts:data/facts/qa.jsonl"], args: {eval.max_new_tokens: 8}}
local: {parallel: 1, nproc: 1, env: {OMP_NUM_THREADS: "1"}}
slurm: {nodes: 1, gpus_per_node: 8, partition: learn, time_min: 240}
```

Run names come from the overrides that differ between runs (`layers-0+1_shared-false`): short,
filesystem-safe, deterministic and unique (a hash suffix settles collisions).

Seeds: with `seeds`, each run is replicated per seed as `NAME_seed-S` (arm NAME); a grow run
grows from its source's run of the same seed. `collect` then reports mean ± std over the seeds
of each arm. An entry's own `seeds` list replaces the sweep's for that entry (more seeds for a
noisy arm without rerunning the others). (A `run.seed` grid axis gives the same names, but grows cannot follow it.)
An entry's own `grid` (it needs a `name`) makes one run per value, `NAME_KEY-VALUE`, all in
tuning group NAME: `report.tune` keeps the best of them per group (the learning-rate search).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launch.config import plain
from launch.runtime.errors import ConfigError

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MAX_NAME = 80
_TOP_KEYS = ("name", "base", "out", "overrides", "grid", "runs", "seeds", "eval", "local", "slurm", "report")
_RUN_KEYS = ("name", "grow", "grid", "seeds")  # non-config keys a `runs` entry may hold
SEED_KEY = "run.seed"
_GROW_KEYS = ("from", "strategy", "depth", "args")


@dataclass
class GrowStep:
    """Grow the final checkpoint of run `source` with `launch.grow` before training this run."""

    source: str
    strategy: str
    depth: int | None = None
    args: dict[str, Any] = field(default_factory=dict)  # extra `launch.grow` key=value arguments


@dataclass
class LocalSettings:
    parallel: int = 1  # runs trained at the same time
    nproc: int = 1  # processes per run (torchrun when > 1)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class SlurmSettings:
    """submitit / SLURM job parameters for each run (one array task per run)."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_gpu: int = 10
    mem_gb: int | None = None
    partition: str | None = None
    time_min: int = 240
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 64  # array tasks running at once
    # seconds before the time limit at which SLURM warns the job (submitit's --signal=USR2@N); the job
    # then has the trainer checkpoint (SIGUSR1 to its workers) and requeues itself
    signal_delay_s: int = 120
    folder: str | None = None  # submitit logs; default OUT/_slurm
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load ...)
    additional: dict[str, Any] = field(default_factory=dict)  # passed as slurm_additional_parameters


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=list)  # launch.eval task specs; empty: no per-run eval
    args: dict[str, Any] = field(default_factory=dict)  # extra launch.eval key=value arguments


@dataclass
class ReportSettings:
    """How `launch.sweep collect` summarises the runs (per-run rows are always written)."""

    plot: str = "bars"  # bars | values (metrics against memory values, dense arms as lines) | curves (val loss vs step)
    # summary/plot metrics; empty: val_ppl and every */exact_match
    metrics: list[str] = field(default_factory=list)
    # keys searched per tuning group (entry grids); best mean kept
    tune: list[str] = field(default_factory=list)
    tune_metric: str = "val_loss"  # lower is better
    reference: str | None = None  # curves: the arm whose final val loss is the target (e.g. scratch)
    # values: the memory arms joined by one line, or LABEL -> arms for several lines (empty: all, one line)
    line: list[str] | dict[str, list[str]] = field(default_factory=list)
    # values: METRIC -> a no-knowledge baseline drawn dotted
    floors: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    name: str
    overrides: dict[str, Any]  # dotted config key -> value (sweep-wide overrides included)
    varied: dict[str, Any]  # the overrides that distinguish this run (for names and tables)
    grow: GrowStep | None = None
    arm: str = ""  # the name without the seed: runs of one arm differ only in run.seed
    group: str = ""  # tuning group: the entry's name when the entry has its own grid, else the arm
    seed: int | None = None


@dataclass
class Sweep:
    name: str
    path: Path
    base: Path
    out: Path
    runs: list[Run]
    eval: EvalSettings
    local: LocalSettings
    slurm: SlurmSettings
    report: ReportSettings = field(default_factory=ReportSettings)

    def run_dir(self, run: Run | str) -> Path:
        return self.out / (run if isinstance(run, str) else run.name)

    def get(self, name: str) -> Run:
        for r in self.runs:
            if r.name == name:
                return r
        raise ConfigError(
            f"sweep {self.name}: no run named {name!r}; runs are {', '.join(r.name for r in self.runs)}"
        )


# ---------------------------------------------------------------------------------------------
# Names


def format_value(value: Any) -> str:
    """A filesystem-safe rendering of an override value: [1, 3] -> '1+3', [] -> 'none'."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif value is None:
        text = "null"
    elif isinstance(value, list | tuple):
        text = "+".join(format_value(v) for v in value) if value else "none"
    elif isinstance(value, dict):
        text = "+".join(f"{k}-{format_value(v)}" for k, v in value.items()) if value else "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
        if "/" in text:  # paths: the file's stem says enough
            text = Path(text).stem
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last component of each dotted key, or more of it where that would be ambiguous."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if not any(other != key and other.split(".")[-n:] == parts[-n:] for other in keys):
                break
        short[key] = cand.replace(".", "-")
    return short


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


def derive_names(varied: list[dict[str, Any]], dedupe: bool = True) -> list[str]:
    """One name per run from the keys whose value differs between runs; deterministic, and unique
    (a hash of the overrides settles collisions) unless `dedupe` is off."""
    keys = [
        k
        for k in dict.fromkeys(k for v in varied for k in v)
        if len({json.dumps(v.get(k), sort_keys=True, default=str) for v in varied}) > 1
    ]
    short = _short_keys(keys)
    names = []
    for v in varied:
        name = "_".join(f"{short[k]}-{format_value(v[k])}" for k in keys if k in v) or "base"
        if len(name) > _MAX_NAME:
            name = f"{name[: _MAX_NAME - 7]}-{_digest(v)}"
        names.append(name)
    if not dedupe:
        return names
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [f"{n}-{_digest(v)}" if counts[n] > 1 else n for n, v in zip(names, varied)]


# ---------------------------------------------------------------------------------------------
# Loading


def _settings(cls: type, data: Any, where: str) -> Any:
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    valid = cls.__dataclass_fields__
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} under {where}; valid: {', '.join(valid)}")
    return cls(**data)


def _grow_step(data: Any, where: str) -> GrowStep:
    if not isinstance(data, dict) or "from" not in data or "strategy" not in data:
        raise ConfigError(f"{where}: grow must be a mapping with 'from' (a run name) and 'strategy'")
    unknown = [k for k in data if k not in _GROW_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown grow key(s) {', '.join(unknown)}; valid: {', '.join(_GROW_KEYS)}"
        )
    return GrowStep(str(data["from"]), str(data["strategy"]), data.get("depth"), dict(data.get("args") or {}))


def expand(grid: dict[str, list] | None, runs: list[dict] | None) -> list[dict[str, Any]]:
    """Override sets: the grid's cartesian product, the list entries, or each entry times the grid."""
    grid = grid or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key} must be a non-empty list of values, got {values!r}")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
    entries = runs if runs else [{}]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"runs[{i}] must be a mapping of overrides, got {entry!r}")
    return [{**entry, **combo} for entry in entries for combo in combos]


def expand_entry_grids(entries: list[dict] | None) -> tuple[list[dict] | None, list[str | None]]:
    """Entries with their own `grid` become one named entry per combination (`NAME_KEY-VALUE`);
    returns the entries and each one's tuning group (the entry's name, or None)."""
    if not entries:
        return entries, []
    out: list[dict] = []
    groups: list[str | None] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "grid" not in entry:
            out.append(entry)
            groups.append(None)
            continue
        if not entry.get("name"):
            raise ConfigError(f"runs[{i}]: an entry with its own grid needs a name (the tuning group)")
        rest = {k: v for k, v in entry.items() if k != "grid"}
        sets = expand(entry["grid"], None)
        for combo, suffix in zip(sets, derive_names(sets)):
            out.append({**rest, **combo, "name": f"{entry['name']}_{suffix}"})
            groups.append(str(entry["name"]))
    return out, groups


def _seeds(data: Any, path: Path, where: str = "") -> list[int]:
    if data is None:
        return []
    if (
        not isinstance(data, list)
        or not data
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in data)
    ):
        raise ConfigError(f"{path}: {where}seeds must be a non-empty list of integers, got {data!r}")
    if len(set(data)) != len(data):
        raise ConfigError(f"{path}: {where}seeds {data} repeat a seed")
    return list(data)


def replicate_seeds(
    runs: list[Run], seeds: list[int], own: list[list[int] | None] | None = None
) -> list[Run]:
    """Each run once per seed (`NAME_seed-S`, run.seed=S); grows follow their source's seed.
    `own[i]`, where given, replaces `seeds` for run i (an entry's own `seeds` list); a run with
    neither stays unseeded."""
    out = []
    for i, r in enumerate(runs):
        run_seeds = (own[i] if own else None) or seeds
        if not run_seeds:
            out.append(r)
            continue
        for s in run_seeds:
            grow = None
            if r.grow is not None:
                grow = GrowStep(f"{r.grow.source}_seed-{s}", r.grow.strategy, r.grow.depth, dict(r.grow.args))
            out.append(
                Run(
                    f"{r.name}_seed-{s}",
                    {**r.overrides, SEED_KEY: s},
                    {**r.varied, SEED_KEY: s},
                    grow,
                    r.arm,
                    r.group,
                    s,
                )
            )
    return out


def _arms(
    names: list[str], varied: list[dict[str, Any]], explicit: list[str | None], grid: dict | None
) -> list[str]:
    """Each run's name without its run.seed grid part (the arm its seeds are averaged over)."""
    if not grid or SEED_KEY not in grid:
        return names
    rest = {k: v for k, v in grid.items() if k != SEED_KEY}
    bare = [{k: v for k, v in var.items() if k != SEED_KEY} for var in varied]
    if any(explicit):
        grid_names = (
            derive_names([{k: v[k] for k in rest} for v in bare], dedupe=False) if rest else [""] * len(bare)
        )
        return [
            (f"{e}_{g}" if g else e) if e else d
            for e, g, d in zip(explicit, grid_names, derive_names(bare, dedupe=False))
        ]
    return derive_names(bare, dedupe=False)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file; every run's config is checked against the schema."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = plain(OmegaConf.load(path))
    except Exception as e:
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping (base, grid, runs, ...)")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_TOP_KEYS)}")
    if "base" not in data:
        raise ConfigError(f"{path}: 'base' (the config every run starts from) is required")
    base = (
        (path.parent / data["base"]).resolve() if not Path(data["base"]).is_absolute() else Path(data["base"])
    )
    if not base.is_file():
        raise ConfigError(f"{path}: base config {base} not found (paths are relative to the sweep file)")
    name = str(data.get("name") or path.stem)
    common = dict(data.get("overrides") or {})
    entries, entry_groups = expand_entry_grids(data.get("runs"))
    sets = expand(data.get("grid"), entries)
    per_combo = len(sets) // max(1, len(entries or [{}]))
    entry_groups = [g for g in (entry_groups or [None]) for _ in range(per_combo)]

    explicit, grows, varied, own_seeds = [], [], [], []
    for i, s in enumerate(sets):
        explicit.append(s.pop("name", None))
        grows.append(_grow_step(s.pop("grow"), f"{path} run {i}") if "grow" in s else None)
        own_seeds.append(_seeds(s.pop("seeds"), path, f"run {explicit[-1] or i}: ") if "seeds" in s else None)
        varied.append(s)
    if any(explicit) and data.get("grid"):
        # a named entry times a grid: the grid's part of the name keeps the runs apart
        grid_keys = list(data["grid"])
        grid_names = derive_names([{k: v[k] for k in grid_keys} for v in varied], dedupe=False)
        names = [f"{e}_{g}" if e else d for e, g, d in zip(explicit, grid_names, derive_names(varied))]
    else:
        names = [e or d for e, d in zip(explicit, derive_names(varied))]
    for n in names:
        if not _NAME_OK.match(n):
            raise ConfigError(f"{path}: run name {n!r} is not filesystem-safe (letters, digits, . _ + -)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: run names {', '.join(dupes)} are used twice")

    arms = _arms(names, varied, explicit, data.get("grid"))
    if any(entry_groups) and set(data.get("grid") or {}) - {SEED_KEY}:
        raise ConfigError(
            f"{path}: an entry's own grid cannot be combined with a top-level grid (other than run.seed)"
        )
    runs = [
        Run(n, {**common, **v}, v, g, arm, grp or arm, v.get(SEED_KEY))
        for n, v, g, arm, grp in zip(names, varied, grows, arms, entry_groups)
    ]
    for r in runs:
        if r.grow is not None and r.grow.source not in names:
            raise ConfigError(
                f"{path}: run {r.name} grows from {r.grow.source!r}, which is not a run of this sweep"
            )
    seeds = _seeds(data.get("seeds"), path)
    if seeds or any(o is not None for o in own_seeds):
        if any(r.seed is not None for r in runs):
            raise ConfigError(f"{path}: give seeds either as `seeds` or as a run.seed override, not both")
        runs = replicate_seeds(runs, seeds, own_seeds)
        seeded = {r.name for r in runs}
        for r in runs:
            if r.grow is not None and r.grow.source not in seeded:
                raise ConfigError(
                    f"{path}: run {r.name} grows from {r.grow.source!r}, which this sweep does not train "
                    "(a grow entry's seeds must be seeds of its source)"
                )
    out = Path(str(data.get("out") or f"runs/sweeps/{name}"))
    sweep = Sweep(
        name=name,
        path=path,
        base=base,
        out=out,
        runs=runs,
        eval=_settings(EvalSettings, data.get("eval"), "eval"),
        local=_settings(LocalSettings, data.get("local"), "local"),
        slurm=_settings(SlurmSettings, data.get("slurm"), "slurm"),
        report=_settings(ReportSettings, data.get("report"), "report"),
    )
    _check_line(sweep.report.line, {r.arm for r in runs}, path)
    for r in runs:
        if r.grow is None:
            run_config(sweep, r)  # fail now, not hours into the sweep
    return sweep


def _check_line(line: Any, arms: set[str], path: Path) -> None:
    """report.line: a list of arms, or LABEL -> list of arms; every arm named must be in the sweep."""
    groups = line if isinstance(line, dict) else {"": line}
    for label, members in groups.items():
        where = f"report.line.{label}" if label else "report.line"
        if not isinstance(members, list):
            raise ConfigError(f"{path}: {where} must be a list of arm names, got {members!r}")
        unknown = [a for a in members if a not in arms]
        if unknown:
            raise ConfigError(
                f"{path}: {where} names {', '.join(map(str, unknown))}, not arms of this sweep; arms: {', '.join(sorted(arms))}"
            )


def override_args(overrides: dict[str, Any]) -> list[str]:
    """key=value command-line arguments; lists and mappings as YAML flow (JSON) text."""
    args = []
    for key, value in overrides.items():
        if isinstance(value, list | dict | bool) or value is None:
            text = json.dumps(value, separators=(",", ":"))  # YAML flow syntax, one shell word
        else:
            text = str(value)
        args.append(f"{key}={text}")
    return args


def run_config(sweep: Sweep, run: Run) -> Any:
    """The run's resolved training config (launch.config.Config)."""
    from launch.config import load_config, validate

    try:
        cfg = load_config(
            [f"config={sweep.base}", *override_args(run.overrides), f"run.dir={sweep.run_dir(run)}"]
        )
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"sweep {sweep.name}, run {run.name}: {e}") from None
    return cfg
