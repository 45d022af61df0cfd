"""Every PNG the project draws (matplotlib, optional: every function returns None without it), for
`launch.report` and `launch.sweep collect`.

- `line_panels`: panels of lines against steps or tokens, one line per run or arm; an arm of
  several seeds drawn as its mean with a ±std band. Loss, learning rate, tokens/s and the memory
  health signals of a report, and the sweep's `curves_plot`, are all drawn by it.
- `slot_histograms`: per memory layer, how many slots were read how often.
- `bars`: one horizontal bar panel per metric, one bar per run.
- `values_plot`: each metric against the number of memory values (log axis), seed mean with ±std
  error bars, one joined line per group of arms (`report.line`); arms without memory (dense) as
  horizontal lines with a ±std band.
- `curves_plot`: validation loss against steps per arm (seed mean, ±std band), with the
  reference arm's final loss as a dashed line (the growth experiment's target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.report.runs import numeric

Curve = list[tuple[float, float, float]]  # (x, mean, std over seeds; 0 for one run)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def bars(rows: list[dict[str, Any]], metrics: list[str], path: Path, title: str) -> Path | None:
    """One horizontal bar panel per metric; None when matplotlib is missing or nothing to draw."""
    plt = _pyplot()
    metrics = [m for m in metrics if any(numeric(r.get(m)) for r in rows)]
    if plt is None or not metrics:
        return None
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.5 * len(metrics), 0.45 * len(rows) + 1.5), squeeze=False
    )
    names = [r["run"] for r in rows]
    for ax, m in zip(axes[0], metrics):
        vals = [r.get(m) if numeric(r.get(m)) else 0.0 for r in rows]
        ax.barh(names, vals, color="tab:blue")
        ax.set_title(m)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.suptitle(title)
    return _save(fig, path)


DEFAULT_LINE = "Memory+ (block FFN -> memory)"


def value_lines(
    summary: list[dict[str, Any]], line: list[str] | dict[str, list[str]] | None
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Split the memory arms (those with `values`) into the plot's joined lines and lone markers.

    `line` is a list of arms (one line), a mapping label -> arms (one line each, e.g. two read
    widths across the value sweep), or empty (every memory arm on one line). Each line's arms are
    sorted by their number of values."""
    memory = [s for s in summary if s.get("values")]
    groups = (
        line
        if isinstance(line, dict)
        else ({DEFAULT_LINE: list(line)} if line else {DEFAULT_LINE: [s["arm"] for s in memory]})
    )
    lines = {
        label: sorted((s for s in memory if s["arm"] in arms), key=lambda s: s["values"])
        for label, arms in groups.items()
    }
    joined = {a for arms in groups.values() for a in arms}
    return {k: v for k, v in lines.items() if v}, [s for s in memory if s["arm"] not in joined]


def values_plot(
    summary: list[dict[str, Any]],
    metrics: list[str],
    path: Path,
    title: str,
    line: list[str] | dict[str, list[str]] | None = None,
    floors: dict[str, float] | None = None,
) -> Path | None:
    """Metric vs number of memory values (seed mean ± std); the `line` arms joined (see
    `value_lines`), other memory arms as single markers, dense arms as horizontal lines."""
    plt = _pyplot()
    metrics = [m for m in metrics if any(numeric(s.get(m)) for s in summary)]
    lines, others = value_lines(summary, line)
    if plt is None or not metrics or not lines:
        return None
    dense = [s for s in summary if not s.get("values")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per drawn series, in order: the lines, the dense arms, the lone markers
    color = lambda i: colors[i % len(colors)]  # noqa: E731
    for ax, m in zip(axes[0], metrics):
        for j, (label, arms) in enumerate(lines.items()):
            pts = [s for s in arms if numeric(s.get(m))]
            xs, ys = [s["values"] for s in pts], [s[m] for s in pts]
            errs = [s.get(f"{m}_std") or 0.0 for s in pts]
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", color=color(j), capsize=4, label=label)
            for s in pts:
                ax.annotate(
                    s["arm"], (s["values"], s[m]), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        for i, s in enumerate(d for d in dense if numeric(d.get(m))):
            c = color(len(lines) + i)
            std = s.get(f"{m}_std") or 0.0
            ax.axhline(s[m], color=c, ls="--", label=f"{s['arm']} ({s.get('params') or 0:,} params)")
            ax.axhspan(s[m] - std, s[m] + std, color=c, alpha=0.12)
        for j, s in enumerate(others):
            if numeric(s.get(m)):
                c = color(len(lines) + len(dense) + j)
                ax.errorbar(
                    [s["values"]],
                    [s[m]],
                    yerr=[s.get(f"{m}_std") or 0.0],
                    fmt="s",
                    capsize=3,
                    color=c,
                    label=s["arm"],
                )
        if floors and m in floors:
            ax.axhline(floors[m], color="gray", ls=":", label=f"majority answer ({floors[m]:.3f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory values (slots)")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def curves_plot(
    curves: dict[str, list[tuple[int, float, float]]],
    target: float | None,
    reference: str | None,
    path: Path,
    title: str,
) -> Path | None:
    """Validation loss vs step per arm (seed mean, ±std band); the target as a dashed line."""
    curves = {a: c for a, c in curves.items() if c}
    if not curves:
        return None
    lo = min(m for c in curves.values() for _, m, _ in c)
    hi = max(m for c in curves.values() for _, m, _ in c[len(c) // 5 :])
    panel = Panel(
        title,
        curves,
        xlabel="steps (grown arms: after growth)",
        ylabel="validation loss",
        styles={reference: {"color": "k", "lw": 2}} if reference else {},
        hlines=[(target, f"{reference} final ({target:.3f})")] if target is not None else [],
        ylim=(lo - 0.05, hi + 0.1),
    )
    return line_panels([panel], path, None, figsize=(8, 5))


@dataclass
class Panel:
    """One axes of `line_panels`: `series` maps a label (a run, an arm) to its curve."""

    title: str
    series: dict[str, Curve]
    xlabel: str = "step"
    ylabel: str = ""
    styles: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> plot keyword arguments
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label): dashed grey lines
    ylim: tuple[float, float] | None = None
    yscale: str = "linear"
    # label -> points drawn as markers in the colour of that label's line (a run's final validation)
    points: dict[str, Curve] = field(default_factory=dict)
    points_label: str = ""  # the points' legend entry ("" none), e.g. "final validation"


def line_panels(
    panels: list[Panel],
    path: Path,
    title: str | None,
    ncols: int = 2,
    figsize: tuple[float, float] | None = None,
) -> Path | None:
    """Panels of lines (mean, with a ±std band where std > 0; a lone point as a marker); panels
    with nothing to draw are left out. None when matplotlib is missing or nothing is left."""
    plt = _pyplot()
    panels = [p for p in panels if any(p.series.values()) or any(p.points.values())]
    if plt is None or not panels:
        return None
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (6.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        colors: dict[str, str] = {}
        for label, curve in panel.series.items():
            if not curve:
                continue
            xs, mean, std = zip(*curve)
            style = {"marker": "o"} if len(curve) == 1 else {}
            line = ax.plot(xs, mean, label=label, **(style | panel.styles.get(label, {})))[0]
            colors[label] = line.get_color()
            if any(std):
                ax.fill_between(
                    xs,
                    [m - s for m, s in zip(mean, std)],
                    [m + s for m, s in zip(mean, std)],
                    color=line.get_color(),
                    alpha=0.15,
                )
        marked = False
        for label, pts in panel.points.items():
            if pts:
                xs, mean, std = zip(*pts)
                legend = panel.points_label if panel.points_label and not marked else None
                ax.errorbar(xs, mean, yerr=[s or 0.0 for s in std], fmt="D", ms=6, capsize=3,
                            color=colors.get(label, "k"), mec="k", label=legend)  # fmt: skip
                marked = marked or legend is not None
        for y, label in panel.hlines:
            ax.axhline(y, color="gray", ls="--", lw=1, label=label)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_yscale(panel.yscale)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def slot_histograms(layers: dict[str, list[int]], path: Path, title: str) -> Path | None:
    """One panel per memory layer: the number of slots (y) read a given number of times (x, log
    bins); the slots never read are counted in the panel's title, beside the normalised entropy."""
    plt = _pyplot()
    if plt is None or not layers:
        return None
    import numpy as np

    ncols = min(3, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (name, counts) in zip(axes.flat, layers.items()):
        c = np.asarray(counts, dtype=np.int64)
        read = c[c > 0]
        if len(read):
            edges = np.unique(np.geomspace(1, read.max() + 1, 30).astype(np.int64))
            ax.hist(read, bins=edges if len(edges) > 1 else 1, color="tab:blue")
            ax.set_xscale("log")
        p = read / max(read.sum(), 1)
        entropy = float(-(p * np.log(p)).sum() / math.log(len(c))) if len(c) > 1 and len(read) else 0.0
        ax.set_title(
            f"{name}\n{len(read):,} of {len(c):,} slots read ({len(read) / len(c):.0%}), entropy {entropy:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("reads of a slot")
        ax.set_ylabel("slots")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def pyplot_missing() -> bool:
    """Whether matplotlib (extra `[plot]`) is missing: reports then hold their tables only."""
    return _pyplot() is None
