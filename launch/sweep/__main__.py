"""Run an ablation sweep: `python -m launch.sweep sweep=FILE mode=local|slurm|dry [parallel=N]`,
then `python -m launch.sweep collect sweep=FILE [out=PREFIX]` for the results tables.

- `dry` prints every run (state, overrides, the commands still needed) and the SLURM job parameters.
- `local` runs them here, `parallel` at a time (default: the sweep file's local.parallel);
  finished runs are skipped and unfinished ones resume from their last checkpoint.
- `slurm` submits one job array through submitit (torchrun inside each job); `cluster=local`
  uses submitit's local executor instead of sbatch, and `wait=true` blocks until the jobs end.
- `only=[NAME,...]` restricts any mode to some runs (a run's name, or an arm's for all its seeds); `slurm.KEY=VALUE` overrides job parameters.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field

from launch.config import load_config
from launch.runtime.errors import ConfigError, run_cli
from launch.sweep.collect import collect
from launch.sweep.runner import command, executor_parameters, plan, run_local, state, submit_slurm
from launch.sweep.spec import SlurmSettings, Sweep, load_sweep

MODES = ("local", "slurm", "dry")


@dataclass
class SweepArgs:
    sweep: str = ""  # the sweep file (required)
    mode: str = "dry"  # local | slurm | dry
    parallel: int | None = None  # local: runs at once (default: the sweep file's local.parallel)
    nproc: int | None = None  # local: processes per run (default: local.nproc)
    only: list[str] = field(default_factory=list)  # run only these runs (run names, or arm names: all seeds)
    cluster: str = "slurm"  # slurm mode: slurm | local (submitit's local executor, for testing)
    wait: bool = False  # slurm mode: block until every job ends
    out: str | None = None  # collect: output path prefix (default SWEEP_OUT/results)
    runs_dir: str | None = None  # override the sweep file's `out`
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


def _load(args: SweepArgs, argv: list[str]) -> Sweep:
    if not args.sweep:
        raise ConfigError(
            "sweep= is required: the sweep file, e.g. sweep=configs/sweeps/memory_vs_dense.yaml"
        )
    sweep = load_sweep(args.sweep)
    if args.runs_dir:
        sweep.out = type(sweep.out)(args.runs_dir)
    # slurm.* on the command line replaces the file's values, key by key
    for arg in argv:
        if arg.startswith("slurm."):
            key = arg.split("=", 1)[0].removeprefix("slurm.")
            setattr(sweep.slurm, key, getattr(args.slurm, key))
    if args.only:
        selected(sweep, args.only)  # fail on an unknown name before anything runs
    return sweep


def selected(sweep: Sweep, only: list[str]) -> set[str] | None:
    """The run names `only=` picks: each entry a run name, or an arm name for all of its seeds
    (`only=[dense,memory_1M]` = every seed of both); None = every run."""
    if not only:
        return None
    names: set[str] = set()
    unknown = []
    for n in only:
        picked = {r.name for r in sweep.runs if n in (r.name, r.arm)}
        names |= picked
        if not picked:
            unknown.append(n)
    if unknown:
        arms = ", ".join(dict.fromkeys(r.arm for r in sweep.runs))
        raise ConfigError(
            f"only={only}: no run or arm named {', '.join(unknown)}; arms are {arms} (runs: ARM_seed-N where the sweep has seeds)"
        )
    return names


def dry(sweep: Sweep, names: set[str] | None, nproc: int) -> None:
    runs = [r for r in sweep.runs if names is None or r.name in names]
    print(f"sweep {sweep.name}: {len(runs)} runs from {sweep.base} into {sweep.out}")
    for r in runs:
        print(f"\n[{state(sweep, r)}] {r.name}  {json.dumps(r.varied)}")
        for step in plan(sweep, r):
            print("  $ python " + shlex.join(command(step, nproc)[1:]))
    print(f"\nlocal: parallel={sweep.local.parallel} nproc={nproc}")
    print("slurm job parameters: " + json.dumps(executor_parameters(sweep), sort_keys=True))


def main(argv: list[str]) -> int:
    collecting = bool(argv) and argv[0] == "collect"
    if collecting:
        argv = argv[1:]
    args = load_config(argv, SweepArgs)
    if args.mode not in MODES:
        raise ConfigError(f"mode={args.mode!r}: expected one of {', '.join(MODES)}")
    sweep = _load(args, argv)
    if collecting:
        for kind, path in collect(sweep, args.out).items():
            print(f"wrote {kind}: {path}")
        return 0
    names = selected(sweep, args.only)
    runs = [r for r in sweep.runs if names is None or r.name in names]
    nproc = args.nproc or sweep.local.nproc
    if args.mode == "dry":
        dry(sweep, names, nproc)
    elif args.mode == "local":
        failed = run_local(sweep, runs, args.parallel or sweep.local.parallel, nproc, {})
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
            return 1
        print(f"all {len(runs)} runs done; tables: python -m launch.sweep collect sweep={args.sweep}")
    else:
        submit_slurm(sweep, runs, cluster=args.cluster, wait=args.wait)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)
