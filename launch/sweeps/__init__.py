"""Config-driven ablations: sweep files (spec), running them (runner), results tables (collect).
The command line is `python -m launch.sweep`."""

from launch.sweeps.collect import collect, collect_rows
from launch.sweeps.runner import plan, run_local, state, submit_slurm
from launch.sweeps.spec import Run, Sweep, derive_names, expand, load_sweep

__all__ = [
    "Run",
    "Sweep",
    "collect",
    "collect_rows",
    "derive_names",
    "expand",
    "load_sweep",
    "plan",
    "run_local",
    "state",
    "submit_slurm",
]
