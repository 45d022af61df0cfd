"""What a report reads from a run directory, also for a run still training or resumed.

- `read_records`: RUN/metrics.jsonl as the run's history. A torn or half-written last line (a
  trainer writing it now) is skipped; a record going back to a step its kind (training,
  validation, final validation, evaluation) already went past, as a job that resumed from an
  earlier checkpoint writes when the file was not cut back, replaces every record from that step
  on: each (step, kind) appears once and the last job's word wins.
- `model_facts`: parameter counts of the model in RUN/config.yaml, built on the meta device.
- `eval_metrics`: RUN/eval/results.json (`launch.eval ... out=RUN/eval`), else evaluation records.
- `run_dirs`: the run directories named on a command line (a directory of runs, such as a
  sweep's `out`, stands for the runs directly inside it).
- `arm_of`: a sweep run's arm (`ARM_seed-S` -> `ARM`); the seeds of one arm are averaged in plots.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from launch.runtime.errors import UserError
from launch.runtime.outputs import is_run_dir
from launch.train.metrics import read_metrics

EVAL = "eval"  # RUN/eval: launch.eval's output for the run (results.json), as the sweep and README write it
SEED_SUFFIX = re.compile(r"^(?P<arm>.+)_seed-\d+$")  # launch.sweep's run names: ARM_seed-S


def numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float]]:
    """(x, mean, std) at the x every curve has."""
    if not curves:
        return []
    common = set.intersection(*({x for x, _ in c} for c in curves))
    by_x = [dict(c) for c in curves]
    return [(x, *mean_std([c[x] for c in by_x])) for x in sorted(common)]  # type: ignore[misc]


def last(records: list[dict], key: str) -> Any:
    """The value of `key` in the last record that has one (None if none does)."""
    for r in reversed(records):
        if key in r and r[key] is not None:
            return r[key]
    return None


def last_of(records: list[dict], *keys: str) -> Any:
    """The last value of the first key that has one."""
    for key in keys:
        if (value := last(records, key)) is not None:
            return value
    return None


# -- metrics.jsonl -------------------------------------------------------------------------------


def record_kind(record: dict) -> str:
    """train | val | final | eval | other:KEYS: what the trainer logged (several kinds share a step)."""
    if "loss" in record:
        return "train"
    if "val_loss" in record:
        return "val"
    if "final_val_loss" in record:
        return "final"
    if any(k.startswith("eval/") for k in record):
        return "eval"
    return "other:" + ",".join(sorted(k for k in record if k != "step"))


def clean_records(records: Iterable[dict]) -> list[dict]:
    """The run's history, in order: records without an integer step dropped; a record whose step is
    below the last of its kind, or whose (step, kind) is already there, starts a new job's history
    from that step (every earlier record at or past it, of any kind, is dropped)."""
    kept: list[dict] = []
    seen: set[tuple[int, str]] = set()
    top: dict[str, int] = {}  # kind -> its last step
    for r in records:
        step = r.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        kind = record_kind(r)
        if step < top.get(kind, -1) or (step, kind) in seen:
            kept = [k for k in kept if k["step"] < step]
            seen = {(k["step"], record_kind(k)) for k in kept}
            top = {}
            for k in kept:
                top[record_kind(k)] = max(top.get(record_kind(k), -1), k["step"])
        kept.append(r)
        seen.add((step, kind))
        top[kind] = max(top.get(kind, -1), step)
    return kept


def read_records(run_dir: str | Path) -> list[dict]:
    """RUN/metrics.jsonl, cleaned (`clean_records`); [] when there is none yet."""
    return clean_records(read_metrics(run_dir))


def tokens_at(records: list[dict]) -> Callable[[float], float]:
    """step -> training tokens seen, from the training records' (step, tokens) (linear between them,
    and past the last one at its tokens per step): validation records carry no token count."""
    import numpy as np

    points = sorted((r["step"], r["tokens"]) for r in records if "loss" in r and numeric(r.get("tokens")))
    if not points:
        return lambda step: float("nan")
    steps = np.array([0.0, *(s for s, _ in points)])
    tokens = np.array([0.0, *(t for _, t in points)])
    per_step = points[-1][1] / points[-1][0] if points[-1][0] else 0.0

    def at(step: float) -> float:
        if step > steps[-1]:
            return float(tokens[-1] + (step - steps[-1]) * per_step)
        return float(np.interp(step, steps, tokens))

    return at


# -- config, parameters, evaluation ------------------------------------------------------------


def config_value(run_dir: Path, dotted: str) -> Any:
    """A key of RUN/config.yaml read as plain YAML (an older run's keys may have been renamed since)."""
    import yaml

    try:
        node = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        for part in dotted.split("."):
            node = node[part]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return node


def model_facts(run_dir: Path) -> dict[str, Any]:
    """params, active_params (per token), values (memory slots; None for dense) and n_layers of the
    model in RUN/config.yaml, built on the meta device; empty when there is no readable config."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import torch

    from launch.config import config_from_file
    from launch.models.build import active_params, build_model

    try:
        cfg = config_from_file(path)
        with torch.device("meta"):
            model = build_model(cfg)
        values = cfg.memory.n_keys**2 if cfg.memory.layers else None
        return {
            "params": model.num_params(),
            "active_params": active_params(model),
            "values": values,
            "n_layers": cfg.model.n_layers,
        }
    except Exception:  # a config from another version of the code: leave the cells empty
        return {}


def eval_metrics(run_dir: Path, records: list[dict]) -> dict[str, float]:
    """TASK/METRIC -> value from RUN/eval/results.json, else the last in-training eval record."""
    path = run_dir / EVAL / "results.json"
    out: dict[str, float] = {}
    if path.is_file():
        try:
            tasks = json.loads(path.read_text()).get("tasks", {})
        except (OSError, ValueError, AttributeError):
            tasks = {}  # being rewritten by launch.eval right now, or not its file: no eval cells
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                if metric != "n" and numeric(value):
                    out[f"{task}/{metric}"] = value
        return out
    for r in records:
        for k, v in r.items():
            if k.startswith("eval/") and numeric(v) and not k.endswith("/n"):
                out[k.removeprefix("eval/")] = v
    return out


# -- which runs --------------------------------------------------------------------------------


def run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """The run directories `paths` name: each a run directory, or a directory of run directories (a
    sweep's `out`: the runs directly inside it, by name). Anything else is one line naming it."""
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if is_run_dir(p):
            out.append(p)
            continue
        inside = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c)) if p.is_dir() else []
        if not inside:
            what = "does not exist" if not p.exists() else ("is a file" if not p.is_dir() else "holds no run")
            raise UserError(
                f"{given} {what}: expected a run directory (its metrics.jsonl, run.lock or checkpoints/step_N) "
                "or a directory of run directories (a sweep's out)"
            )
        out.extend(inside)
    if not out:
        raise UserError("no run directory given: python -m launch.report RUN [RUN ...] [out=DIR]")
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def arm_of(name: str) -> str:
    """The arm of a sweep run `ARM_seed-S`; any other name is its own arm."""
    m = SEED_SUFFIX.match(name)
    return m.group("arm") if m else name
