"""Results tables of a sweep: one row per run from RUN/metrics.jsonl, RUN/eval/results.json,
RUN/sweep_steps.jsonl (wall time, peak RSS) and the run's config (parameter counts, memory values),
then one row per arm with mean ± std over seeds, written as Markdown and CSV, with a PNG chosen
by the sweep file's `report.plot` when matplotlib is installed (launch.report.plots). Reading a run
(metrics, parameter counts, evaluation results) and the tables are launch.report's, shared with
`python -m launch.report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launch.report.runs import eval_metrics, last, last_of, mean_curve, model_facts, numeric, read_records
from launch.report.tables import cell, to_csv, to_markdown
from launch.report.write import MEMORY_COLUMNS
from launch.sweep.runner import STEPS_LOG, state
from launch.sweep.spec import Sweep, format_value
from launch.sweep.summary import (
    REACH,
    REACH_EQUIV,
    USED_EQUIV,
    WORTH,
    mark_best,
    reach_reference,
    summarise,
)

BASE_COLUMNS = (
    "run",
    "state",
    "steps",
    "tokens",
    "loss",
    "val_loss",
    "val_ppl",
    "params",
    "active_params",
    "values",
    "tokens_per_s",
    "peak_rss_mb",
    "train_wall_s",
)


def step_costs(run_dir: Path) -> dict[str, float]:
    """Wall time and peak RSS of the last local train step (RUN/sweep_steps.jsonl), if recorded."""
    path = run_dir / STEPS_LOG
    if not path.is_file():
        return {}
    trains = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    trains = [t for t in trains if t.get("kind") == "train" and t.get("exit") == 0]
    if not trains:
        return {}
    return {"train_wall_s": trains[-1]["wall_s"], "peak_rss_mb": trains[-1]["peak_rss_mb"]}


def val_curve(records: list[dict]) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["val_loss"])) for r in records if numeric(r.get("val_loss"))]


def collect_rows(
    sweep: Sweep, curves: dict[str, list[tuple[int, float]]] | None = None
) -> list[dict[str, Any]]:
    """One row per run; with `curves`, also fills RUN_NAME -> its validation-loss curve."""
    rows = []
    for run in sweep.runs:
        run_dir = sweep.run_dir(run)
        records = read_records(run_dir)
        train = [r for r in records if "loss" in r]
        facts = model_facts(run_dir)
        speeds = [r["tokens_per_s"] for r in train if numeric(r.get("tokens_per_s"))]
        row: dict[str, Any] = {"run": run.name, "state": state(sweep, run)}
        row |= {k: format_value(v) if isinstance(v, list | dict) else v for k, v in run.varied.items()}
        row |= {
            "steps": last(train, "step"),
            "tokens": last(train, "tokens"),
            "loss": last(train, "loss"),
            # The last periodic validation, else the end-of-training one: a run with
            # train.val_every=0 has only final_val_* records, and its columns must not stay empty.
            "val_loss": last_of(records, "val_loss", "final_val_loss"),
            "val_ppl": last_of(records, "val_ppl", "final_val_ppl"),
            "params": facts.get("params"),
            "active_params": facts.get("active_params"),
            "values": facts.get("values"),
            "tokens_per_s": sorted(speeds)[len(speeds) // 2]
            if speeds
            else None,  # median: robust to a busy machine
        }
        row |= {col: v for col, key in MEMORY_COLUMNS.items() if (v := last(train, key)) is not None}
        row |= step_costs(run_dir)
        row |= eval_metrics(run_dir, records)
        if curves is not None:
            curves[run.name] = val_curve(records)
        rows.append(row)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(k for r in rows for k in r)
    varied = [k for k in seen if k not in BASE_COLUMNS and k not in MEMORY_COLUMNS and "/" not in k]
    evals = [k for k in seen if "/" in k]
    memory = [k for k in MEMORY_COLUMNS if k in seen]
    return ["run", *varied, *[c for c in BASE_COLUMNS if c != "run"], *memory, *evals]


def summary_metrics(sweep: Sweep, cols: list[str]) -> list[str]:
    """report.metrics, else val_loss, val_ppl and every exact-match column; plus the costs."""
    chosen = sweep.report.metrics or ["val_loss", "val_ppl", *[c for c in cols if c.endswith("/exact_match")]]
    extra = [c for c in MEMORY_COLUMNS if c in cols] + ["tokens_per_s", "peak_rss_mb", "train_wall_s"]
    return [*chosen, *[c for c in extra if c not in chosen]]


def _pm(mean: Any, std: Any) -> str:
    if mean is None:
        return ""
    return cell(mean) + (f" ± {cell(std)}" if numeric(std) and std > 0 else "")


def summary_markdown(summary: list[dict[str, Any]], metrics: list[str], tuned: bool, reach: bool) -> str:
    cols = ["arm", "seeds", "params", "active_params", "values", *metrics]
    extra = (["overhead_pct", REACH, REACH_EQUIV, USED_EQUIV, WORTH] if reach else []) + (
        ["best"] if tuned else []
    )
    lines = ["| " + " | ".join(cols + extra) + " |", "|" + "---|" * len(cols + extra)]
    for s in summary:
        cells = [
            s["arm"],
            f"{s['seeds']}/{s['of']}",
            cell(s.get("params")),
            cell(s.get("active_params")),
            cell(s.get("values")),
        ]
        cells += [_pm(s.get(m), s.get(f"{m}_std")) for m in metrics]
        if reach:
            cells += [
                cell(s.get("overhead_pct")),
                cell(s.get(REACH)) or "not reached",
                cell(s.get(REACH_EQUIV)) or "—",
            ]
            cells += [cell(s.get(USED_EQUIV)), cell(s.get(WORTH)) or "beyond its end"]
        if tuned:
            cells.append("**best**" if s.get("best") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def growth_layers(sweep: Sweep, facts: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """arm -> (depth, base depth, base steps) for every grown arm whose runs have configs."""
    out = {}
    for run in sweep.runs:
        if run.grow is None or run.arm in out:
            continue
        mine, base = facts.get(run.name, {}), facts.get(run.grow.source, {})
        base_steps = base.get("steps")
        if mine.get("n_layers") and base.get("n_layers") and base_steps:
            out[run.arm] = (mine["n_layers"], base["n_layers"], base_steps)
    return out


def add_overhead(sweep: Sweep, summary: list[dict[str, Any]]) -> None:
    """overhead_pct on grown arms: their parameters beyond their base's, as % of the base."""
    params = {s["arm"]: s.get("params") for s in summary}
    for s in summary:
        run = next(r for r in sweep.runs if r.arm == s["arm"])
        base = params.get(sweep.get(run.grow.source).arm) if run.grow else None
        if base and s.get("params"):
            s["overhead_pct"] = round(100 * (s["params"] - base) / base, 2)


def collect(
    sweep: Sweep, out: str | Path | None = None, plot_metrics: list[str] | None = None
) -> dict[str, Path]:
    """Write OUT.md and OUT.csv (one row per run), OUT_summary.csv (one row per arm, mean and std
    over seeds) and OUT.png; OUT defaults to SWEEP_OUT/results."""
    from launch.report import plots

    run_curves: dict[str, list[tuple[int, float]]] = {}
    rows = collect_rows(sweep, run_curves)
    cols = columns(rows)
    prefix = Path(out) if out else sweep.out / "results"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    path = {
        k: prefix.with_name(prefix.name + suffix)
        for k, suffix in (("md", ".md"), ("csv", ".csv"), ("summary", "_summary.csv"), ("png", ".png"))
    }

    metrics = summary_metrics(sweep, cols)
    summary = summarise(sweep, rows, metrics)
    tuned = bool(sweep.report.tune)
    if tuned:
        mark_best(sweep, summary)
    curves = {}
    for arm in dict.fromkeys(r.arm for r in sweep.runs):
        members = [
            run_curves[r.name]
            for r, row in zip(sweep.runs, rows)
            if r.arm == arm and row["state"] == "done" and run_curves[r.name]
        ]
        curves[arm] = mean_curve(members)
    facts = {
        r.name: {"n_layers": model_facts(sweep.run_dir(r)).get("n_layers"), "steps": row.get("steps")}
        for r, row in zip(sweep.runs, rows)
    }
    layers = growth_layers(sweep, facts)
    reached = reach_reference(sweep, summary, curves, layers)
    reference, target = reached if reached else (None, None)
    add_overhead(sweep, summary)

    seeds = sorted({r.seed for r in sweep.runs if r.seed is not None})
    header = f"# Sweep `{sweep.name}`\n\nBase config `{sweep.base.name}`; runs under `{sweep.out}`.\n\n"
    body = f"## Per arm: mean ± std over seeds {seeds}\n\n" if seeds else "## Per arm\n\n"
    body += summary_markdown(summary, metrics, tuned, target is not None)
    if target is not None:
        body += (
            f"\nTarget: `{reference}`'s final mean val loss {target:.4f}. `{REACH}`: first validation step "
            f"(after growth for grown arms) where the seed-mean val loss is at or below it; `{REACH_EQUIV}` adds the "
            f"base's steps scaled by base depth / grown depth. `{USED_EQUIV}`: the steps the arm trained, counted the "
            f"same way; `{WORTH}`: the first step at which `{reference}`'s seed-mean val loss reaches this arm's final "
            f"mean — an arm that matches more reference steps than it used trained more efficiently.\n"
        )
    if tuned:
        body += f"\n`best`: lowest mean `{sweep.report.tune_metric}` in its tuning group (search over {', '.join(sweep.report.tune)}).\n"
    path["md"].write_text(header + body + "\n## Per run\n\n" + to_markdown(rows, cols))
    path["csv"].write_text(to_csv(rows, cols))
    scols = [
        "arm",
        "group",
        "seeds",
        "of",
        "params",
        "active_params",
        "values",
        *[x for m in metrics for x in (m, f"{m}_std")],
    ]
    scols += ["overhead_pct", REACH, REACH_EQUIV, USED_EQUIV, WORTH] * (target is not None) + ["best"] * tuned
    path["summary"].write_text(to_csv(summary, scols))
    written = {k: path[k] for k in ("md", "csv", "summary")}
    title = f"sweep {sweep.name}" + (" (mean ± std over the seeds done: see the table)" if seeds else "")
    kind = sweep.report.plot
    if kind == "values":
        png = plots.values_plot(
            summary,
            plot_metrics or [m for m in metrics if "/" in m or m.startswith("val_")],
            path["png"],
            title,
            sweep.report.line,
            sweep.report.floors,
        )
    elif kind == "curves":
        shown = [s["arm"] for s in summary if not tuned or s.get("best")]
        png = plots.curves_plot({a: curves[a] for a in shown}, target, reference, path["png"], title)
    else:
        png = plots.bars(
            rows,
            plot_metrics or ["val_ppl", *[c for c in cols if c.endswith("/exact_match")]],
            path["png"],
            title,
        )
    if png is not None:
        written["png"] = png
    return written
