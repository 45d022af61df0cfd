"""A report of any set of runs: `report.md` (the table, then the plots) and its PNGs.

`report_rows(runs)` is the table, one dict per run; `write_report(runs, out)` writes the whole
report and returns the path of report.md. Runs of a sweep (`ARM_seed-S`) are drawn per arm, their
mean with a ±std band; every other run is a line of its own. Nothing in a run is written: the
report goes to its own directory (safe-output rule, launch.runtime.outputs), replaced when it holds
an earlier report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.report import plots
from launch.report.runs import (
    arm_of,
    config_value,
    eval_metrics,
    last,
    mean_curve,
    model_facts,
    numeric,
    read_records,
    record_kind,
    run_dirs,
    tokens_at,
)
from launch.report.tables import to_csv, to_markdown
from launch.runtime.errors import UserError
from launch.runtime.outputs import output_dir

COMMAND = "launch.report"  # recorded in the output's marker: a later report replaces only a report
COLUMNS = (
    "run",
    "step",
    "of",
    "tokens",
    "params",
    "active_params",
    "loss",
    "val_loss",
    "val_ppl",
    "final_val_loss",
    "final_val_ppl",
    "tokens_per_s",
    "wall_s",
    "peak_mem_mb",
)
# Memory runs only: slot use in the last logging window (memlayers' MemoryPool.usage_stats), i.e. the
# fraction of all slots read at least once and the normalised entropy of the reads. A table that is
# mostly unread holds parameters the model cannot use, which no loss column shows.
MEMORY_COLUMNS = {"slots_read": "mem_slots_read_frac", "usage_entropy": "mem_usage_entropy"}
HEALTH = tuple(MEMORY_COLUMNS.values())  # metrics.jsonl keys (a second pool's carry `_1`, ...)


@dataclass
class Run:
    path: Path
    label: str  # the run's name in the table and legends
    arm: str  # runs of one arm (a sweep's seeds) are averaged in the plots
    records: list[dict] = field(default_factory=list)

    def curve(self, key: str, kind: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if record_kind(r) == kind and numeric(r.get(key))]


def load_runs(runs: Sequence[str | Path], arms: Mapping[str, str] | None = None) -> list[Run]:
    """The runs `runs` names (see `run_dirs`), labelled by directory name (by path when two share a
    name), with their cleaned records. `arms` (label or path -> arm) overrides the seed grouping."""
    paths = run_dirs(runs)
    names = [p.name for p in paths]
    labels = names if len(set(names)) == len(names) else [str(p) for p in paths]
    arms = arms or {}
    out = []
    for p, label in zip(paths, labels):
        arm = arms.get(label) or arms.get(str(p)) or arm_of(label)
        out.append(Run(p, label, arm, read_records(p)))
    return out


def run_row(run: Run) -> dict[str, Any]:
    """The table row of one run: the latest training record's step, tokens and loss, the latest
    validation and final validation, the median tokens/s, the training wall time and the highest
    peak memory logged, the memory health signals, evaluation results and parameter counts."""
    records = run.records
    train = [r for r in records if record_kind(r) == "train"]
    facts = model_facts(run.path)
    speeds = [r["tokens_per_s"] for r in train if numeric(r.get("tokens_per_s"))]
    peaks = [r["peak_mem_mb"] for r in train if numeric(r.get("peak_mem_mb"))]
    row: dict[str, Any] = {
        "run": run.label,
        "arm": run.arm,
        "step": last(train, "step"),
        "of": config_value(run.path, "train.steps"),
        "tokens": last(train, "tokens"),
        "params": facts.get("params"),
        "active_params": facts.get("active_params"),
        "loss": last(train, "loss"),
        "val_loss": last(records, "val_loss"),
        "val_ppl": last(records, "val_ppl"),
        "final_val_loss": last(records, "final_val_loss"),
        "final_val_ppl": last(records, "final_val_ppl"),
        "tokens_per_s": statistics.median_high(speeds) if speeds else None,  # robust to a busy machine
        "wall_s": last(train, "wall_s"),
        "peak_mem_mb": max(peaks) if peaks else None,
    }
    row |= {col: v for col, key in MEMORY_COLUMNS.items() if (v := last(train, key)) is not None}
    row |= eval_metrics(run.path, records)
    return row


def report_rows(runs: Sequence[str | Path], arms: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per run (`run_row`): the report's table as dicts, every number as metrics.jsonl has it."""
    return [run_row(r) for r in load_runs(runs, arms)]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(k for r in rows for k in r)
    grouped = any(r["arm"] != r["run"] for r in rows)
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows) or c in ("run", "step")]
    return [cols[0], *(["arm"] if grouped else []), *cols[1:]] + [
        *[k for k in MEMORY_COLUMNS if k in seen],
        *[k for k in seen if "/" in k],
    ]


# -- plots -------------------------------------------------------------------------------------


def _by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    arms: dict[str, list[Run]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    return arms


def series(runs: list[Run], key: str, kind: str, x: str = "step") -> dict[str, plots.Curve]:
    """label -> (x, mean, std) of `key` in the `kind` records: one curve per run, or per arm of
    several runs (mean ± std at the steps all its runs logged). x: step | tokens."""
    out: dict[str, plots.Curve] = {}
    for arm, members in _by_arm(runs).items():
        curves = [c for m in members if (c := m.curve(key, kind))]
        if not curves:
            continue
        label = members[0].label if len(members) == 1 else f"{arm} ({len(curves)} seeds)"
        curve = mean_curve(curves)  # type: ignore[arg-type]
        if x == "tokens":
            at = tokens_at(members[0].records)
            curve = [(at(step), m, s) for step, m, s in curve]
        out[label] = curve
    return out


def _keys(runs: list[Run], prefix: str) -> list[str]:
    return list(dict.fromkeys(k for r in runs for rec in r.records for k in rec if k.startswith(prefix)))


def draw(runs: list[Run], out: Path, title: str) -> dict[str, Path]:
    """The PNGs of the report (name -> path); none when matplotlib is missing."""
    P = plots.Panel
    drawn: dict[str, Path | None] = {}
    for x, name, xlabel in (("step", "loss_steps", "step"), ("tokens", "loss_tokens", "training tokens")):
        val, final = series(runs, "val_loss", "val", x), series(runs, "final_val_loss", "final", x)
        val |= {
            k: v for k, v in final.items() if k not in val
        }  # no periodic validation: the final as a point
        drawn[name] = plots.line_panels(
            [
                P("training loss", series(runs, "loss", "train", x), xlabel, "loss"),
                P(
                    "validation loss",
                    val,
                    xlabel,
                    "loss",
                    points={k: v for k, v in final.items() if v is not val.get(k)},
                    points_label="end-of-training validation",
                ),
            ],
            out / f"{name}.png",
            f"{title}: loss against {xlabel}",
        )
    groups = _keys(runs, "lr/") or ["lr"]
    drawn["lr"] = plots.line_panels(
        [P(g, series(runs, g, "train"), "step", "learning rate") for g in groups],
        out / "lr.png",
        f"{title}: learning rate per optimizer group",
        ncols=3,
    )
    drawn["tokens_per_s"] = plots.line_panels(
        [P("training tokens/s", series(runs, "tokens_per_s", "train"), "step", "tokens/s")],
        out / "tokens_per_s.png",
        f"{title}: throughput",
        ncols=1,
        figsize=(8, 4.5),
    )
    health = [k for k in _keys(runs, "mem_") if k.startswith(HEALTH)]
    drawn["memory"] = plots.line_panels(
        [P(k, series(runs, k, "train"), "step", k) for k in health],
        out / "memory.png",
        f"{title}: memory health (last logging window)",
    )
    return {k: v for k, v in drawn.items() if v is not None}


def slot_read_plots(runs: list[Run], out: Path, sequences: int) -> tuple[dict[str, Path], list[str]]:
    """slot_reads_LABEL.png for each memory run with a checkpoint, and one note per run saying what
    was measured (or why nothing was)."""
    from launch.report.slot_reads import measure_slot_reads

    drawn, notes = {}, []
    for run in runs:
        if not config_value(run.path, "memory.layers"):
            continue
        try:
            reads = measure_slot_reads(run.path, sequences)
        except UserError as e:
            notes.append(f"`{run.label}`: no slot-read histogram: {e}")
            continue
        if reads is None:
            continue
        name = "slot_reads_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in run.label)
        png = plots.slot_histograms(
            {k: list(v) for k, v in reads.layers.items()},
            out / f"{name}.png",
            f"{run.label}: slot reads per memory layer, step {reads.step}, {reads.sequences} {reads.split} sequences",
        )
        if png is not None:
            drawn[name] = png
        notes.append(
            f"`{run.label}`: checkpoint step {reads.step} read the first {reads.sequences} {reads.split} "
            f"sequences; per layer: {_read_fractions(reads.layers)}"
        )
    return drawn, notes


def _read_fractions(layers: dict) -> str:
    return ", ".join(f"`{k}` {int((v > 0).sum()):,}/{len(v):,} slots read" for k, v in layers.items())


# -- the report --------------------------------------------------------------------------------


def default_out(paths: list[Path]) -> Path:
    """RUN/report for one run; PARENT/report for runs sharing a parent (a sweep's out)."""
    if len(paths) == 1:
        return paths[0] / "report"
    parents = {p.absolute().parent for p in paths}
    if len(parents) == 1:
        return parents.pop() / "report"
    raise UserError(
        f"out= is required: the {len(paths)} runs are not all in one directory, so there is no default report place"
    )


def write_report(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    arms: Mapping[str, str] | None = None,
    slot_sequences: int = 32,
    title: str | None = None,
) -> Path:
    """Write report.md, runs.csv and the PNGs for `runs` into `out` (default: `default_out`) and
    return the path of report.md. `slot_sequences`: validation sequences each memory run's newest
    checkpoint reads for its slot-read histogram (0: none)."""
    loaded = load_runs(runs, arms)
    target = Path(out) if out is not None else default_out([r.path for r in loaded])
    title = title or (loaded[0].label if len(loaded) == 1 else f"{len(loaded)} runs")
    rows = [run_row(r) for r in loaded]
    cols = columns(rows)
    with output_dir(target, command=COMMAND, overwrite=True) as tmp:
        pngs = draw(loaded, tmp, title)
        notes: list[str] = []
        if slot_sequences > 0:
            slots, notes = slot_read_plots(loaded, tmp, slot_sequences)
            pngs |= slots
        (tmp / "runs.csv").write_text(to_csv(rows, cols))
        (tmp / "report.md").write_text(_markdown(loaded, rows, cols, pngs, notes, title))
    return target / "report.md"


SECTIONS = (
    ("Loss", ("loss_steps", "loss_tokens")),
    ("Learning rate", ("lr",)),
    ("Throughput", ("tokens_per_s",)),
    ("Memory health", ("memory",)),
)


def _markdown(runs: list[Run], rows, cols, pngs: dict[str, Path], notes: list[str], title: str) -> str:
    text = [f"# Report: {title}", ""]
    text.append(f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(runs)} run(s):")
    text += [f"- `{r.label}`: `{r.path}`" for r in runs]
    text += [
        "",
        "## Runs",
        "",
        "Latest training record (`step` of `of`, `tokens`, `loss`), latest validation (`val_*`) and end-of-training "
        "validation (`final_val_*`), median `tokens_per_s`, training `wall_s` over all jobs, highest `peak_mem_mb` "
        "(rank 0), evaluation results (`TASK/METRIC`, from `RUN/eval/results.json`); a run still training "
        "shows what it has written so far.",
        "",
        to_markdown(rows, cols),
        "runs.csv holds the same table with every digit.",
        "",
    ]
    if not pngs and plots.pyplot_missing():
        text += ["No plots: matplotlib is not installed (`pip install 'memscale[plot]'`).", ""]
    for heading, names in SECTIONS:
        shown = [n for n in names if n in pngs]
        if shown:
            text += [f"## {heading}", ""] + [f"![{n}]({pngs[n].name})" for n in shown] + [""]
    slots = [n for n in pngs if n.startswith("slot_reads_")]
    if slots or notes:
        text += [
            "## Slot reads per memory layer",
            "",
            "Measured on each memory run's newest checkpoint (checkpoints keep no usage counts): how many "
            "slots each layer reads how often over the first validation sequences.",
            "",
        ]
        text += [f"- {n}" for n in notes] + [""] + [f"![{n}]({pngs[n].name})" for n in slots] + [""]
    return "\n".join(text)
