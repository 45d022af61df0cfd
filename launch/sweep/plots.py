"""The PNG of a sweep's results (matplotlib, optional: every function returns None without it).

- `bars`: one horizontal bar panel per metric, one bar per run.
- `values_plot`: each metric against the number of memory values (log axis), seed mean with ±std
  error bars, one joined line per group of arms (`report.line`); arms without memory (dense) as
  horizontal lines with a ±std band.
- `curves_plot`: validation loss against steps per arm (seed mean, ±std band), with the
  reference arm's final loss as a dashed line (the growth experiment's target).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch.sweep.summary import numeric


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
    plt = _pyplot()
    curves = {a: c for a, c in curves.items() if c}
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, c in curves.items():
        steps, mean, std = zip(*c)
        style = {"color": "k", "lw": 2} if arm == reference else {}
        line = ax.plot(steps, mean, label=arm, **style)[0]
        ax.fill_between(
            steps,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=line.get_color(),
            alpha=0.15,
        )
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"{reference} final ({target:.3f})")
    lo = min(m for c in curves.values() for _, m, _ in c)
    hi = max(m for c in curves.values() for _, m, _ in c[len(c) // 5 :])
    ax.set_ylim(lo - 0.05, hi + 0.1)
    ax.set_xlabel("steps (grown arms: after growth)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(fig, path)
