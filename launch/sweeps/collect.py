"""Results tables of a sweep: one row per run from RUN/metrics.jsonl, RUN/eval/results.json and
the run's config (parameter counts), written as Markdown and CSV (and a PNG bar chart when
matplotlib is installed)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from launch.metrics import read_metrics
from launch.sweeps.runner import EVAL, state
from launch.sweeps.spec import Sweep, format_value

BASE_COLUMNS = ("run", "state", "steps", "tokens", "loss", "val_loss", "val_ppl", "params", "active_params")


def _last(records: list[dict], key: str) -> Any:
    for r in reversed(records):
        if key in r and r[key] is not None:
            return r[key]
    return None


def param_counts(run_dir: Path) -> tuple[int | None, int | None]:
    """(total, active per token) of the model in RUN/config.yaml, built on the meta device."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, None
    import torch

    from launch.build import active_params, build_model
    from launch.config import config_from_file

    try:
        cfg = config_from_file(path)
        with torch.device("meta"):
            model = build_model(cfg)
        return model.num_params(), active_params(model)
    except Exception:  # a config from another version of the code: leave the cells empty
        return None, None


def eval_metrics(run_dir: Path, records: list[dict]) -> dict[str, float]:
    """TASK/METRIC -> value from RUN/eval/results.json, else the last in-training eval record."""
    path = run_dir / EVAL / "results.json"
    out: dict[str, float] = {}
    if path.is_file():
        tasks = json.loads(path.read_text()).get("tasks", {})
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                if metric != "n" and isinstance(value, int | float):
                    out[f"{task}/{metric}"] = value
        return out
    for r in records:
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, int | float) and not k.endswith("/n"):
                out[k.removeprefix("eval/")] = v
    return out


def collect_rows(sweep: Sweep) -> list[dict[str, Any]]:
    rows = []
    for run in sweep.runs:
        run_dir = sweep.run_dir(run)
        records = read_metrics(run_dir)
        train = [r for r in records if "loss" in r]
        params, active = param_counts(run_dir)
        row: dict[str, Any] = {"run": run.name, "state": state(sweep, run)}
        row |= {k: format_value(v) if isinstance(v, list | dict) else v for k, v in run.varied.items()}
        row |= {
            "steps": _last(train, "step"),
            "tokens": _last(train, "tokens"),
            "loss": _last(train, "loss"),
            "val_loss": _last(records, "val_loss"),
            "val_ppl": _last(records, "val_ppl"),
            "params": params,
            "active_params": active,
        }
        row |= eval_metrics(run_dir, records)
        rows.append(row)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(k for r in rows for k in r)
    varied = [k for k in seen if k not in BASE_COLUMNS and "/" not in k]
    evals = [k for k in seen if "/" in k]
    return ["run", *varied, *[c for c in BASE_COLUMNS if c != "run"], *evals]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 100_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def to_markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    return buf.getvalue()


def plot(rows: list[dict[str, Any]], metrics: list[str], path: Path, title: str) -> Path | None:
    """One horizontal bar panel per metric; None when matplotlib is missing or nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = [m for m in metrics if any(isinstance(r.get(m), int | float) for r in rows)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.45 * len(rows) + 1.5), squeeze=False)
    names = [r["run"] for r in rows]
    for ax, m in zip(axes[0], metrics):
        vals = [r.get(m) if isinstance(r.get(m), int | float) else 0.0 for r in rows]
        ax.barh(names, vals, color="tab:blue")
        ax.set_title(m)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def collect(sweep: Sweep, out: str | Path | None = None, plot_metrics: list[str] | None = None) -> dict[str, Path]:
    """Write OUT.md, OUT.csv (and OUT.png); OUT defaults to SWEEP_OUT/results."""
    rows = collect_rows(sweep)
    cols = columns(rows)
    prefix = Path(out) if out else sweep.out / "results"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    header = f"# Sweep `{sweep.name}`\n\nBase config `{sweep.base.name}`; runs under `{sweep.out}`.\n\n"
    md_path.write_text(header + to_markdown(rows, cols))
    csv_path.write_text(to_csv(rows, cols))
    written = {"md": md_path, "csv": csv_path}
    if plot_metrics is None:
        plot_metrics = ["val_ppl", *[c for c in cols if c.endswith("/exact_match")]]
    png = plot(rows, plot_metrics, prefix.with_name(prefix.name + ".png"), f"sweep {sweep.name}")
    if png is not None:
        written["png"] = png
    return written
