"""Per-arm summaries of a sweep's runs: mean ± std over seeds, the best setting of each tuning
group (the learning-rate search), and for growth sweeps the steps each arm needs to reach a
reference arm's final validation loss (after growth, and counted with the base's training)."""

from __future__ import annotations

from typing import Any

from launch.report.runs import mean_std, numeric
from launch.sweep.spec import Sweep

REACH = "steps_to_target"  # first step whose seed-mean val loss <= the reference's final mean
REACH_EQUIV = "equiv_steps_to_target"  # the same plus base training, in grown-depth step equivalents
USED_EQUIV = "equiv_steps_used"  # the arm's own steps (plus base training, as above) at its last validation
WORTH = "reference_steps_matched"  # first step at which the reference's seed-mean val loss <= this arm's final mean


def summarise(sweep: Sweep, rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per arm, in sweep order: seeds done, constants of the arm (from any run of it), and
    METRIC and METRIC_std over the finished (`done`) runs only."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for run, row in zip(sweep.runs, rows):
        by_arm.setdefault(run.arm, []).append(row)
    groups = {r.arm: r.group for r in sweep.runs}
    out = []
    for arm, members in by_arm.items():
        done = [m for m in members if m.get("state") == "done"]
        use = done or members
        s: dict[str, Any] = {"arm": arm, "group": groups[arm], "seeds": len(done), "of": len(members)}
        for key in ("params", "active_params", "values"):
            s[key] = next((m[key] for m in use if m.get(key) is not None), None)
        for metric in metrics:  # finished seeds only: a partial run's figures are not results yet
            s[metric], s[f"{metric}_std"] = mean_std([m[metric] for m in done if numeric(m.get(metric))])
        out.append(s)
    return out


def mark_best(sweep: Sweep, summary: list[dict[str, Any]]) -> None:
    """`best` = True on the arm with the lowest mean report.tune_metric of each tuning group."""
    metric = sweep.report.tune_metric
    best: dict[str, dict[str, Any]] = {}
    for s in summary:
        if numeric(s.get(metric)) and (s["group"] not in best or s[metric] < best[s["group"]][metric]):
            best[s["group"]] = s
    for s in summary:
        s["best"] = best.get(s["group"]) is s


def first_reaching(curve: list[tuple[int, float, float]], target: float) -> int | None:
    return next((step for step, loss, _ in curve if loss <= target), None)


def reach_reference(
    sweep: Sweep,
    summary: list[dict[str, Any]],
    curves: dict[str, list[tuple[int, float, float]]],
    layers: dict[str, tuple[int, int, int]],
) -> tuple[str, float] | None:
    """Fill REACH and REACH_EQUIV for every arm against report.reference's final mean val loss.

    `layers[arm]` = (this arm's depth, its base's depth, its base's training steps) for grown arms:
    a base step costs base_depth/depth of a step at this depth, so the equivalent count is
    base_steps * base_depth / depth + steps after growth. Returns (reference arm, target loss);
    `report.reference` may name a tuning group, whose best arm is then the reference."""
    ref = sweep.report.reference
    if ref and ref not in curves:  # a tuning group: its best arm
        ref = next((s["arm"] for s in summary if s["group"] == ref and s.get("best")), None)
    if not ref or not curves.get(ref):
        return None
    target = curves[ref][-1][1]
    for s in summary:
        curve = curves.get(s["arm"], [])
        base = 0.0
        if s["arm"] in layers:
            depth, base_depth, base_steps = layers[s["arm"]]
            base = base_steps * base_depth / depth
        reach = first_reaching(curve, target)
        s[REACH] = reach
        s[REACH_EQUIV] = round(base + reach) if reach is not None else None
        # When an arm stops short of the target: how many reference steps its final loss is worth,
        # against what it spent (equivalent steps) — the efficiency read off the curves.
        s[USED_EQUIV] = round(base + curve[-1][0]) if curve else None
        s[WORTH] = first_reaching(curves[ref], curve[-1][1]) if curve else None
    return ref, target
