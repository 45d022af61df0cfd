"""Does a metric rise with the number of memory values, and by how much over a baseline arm?
Seed-level statistics for the claim "recall rises monotonically with values" (issue: research (a)).

    python -m experiments.value_trend --csv experiments/results/sweep_capacity_cpu1k.csv \
        --sweep configs/sweeps/capacity_cpu1k.yaml \
        --arms memory_16k_qknorm_wide,memory_65k_qknorm_wide,memory_262k_qknorm_wide,memory_1M_qknorm_wide \
        --baseline dense_0.3M --metric facts_seen/exact_match \
        [--out experiments/results/sweep_capacity_cpu1k_trend_seen] [--boot 20000]

Reads the per-run table that `launch.sweep collect` writes (finished runs only) and reports, for the
arms ordered by their number of values:
- each arm's per-seed figures and mean ± std;
- the least-squares slope of the metric against log2(values) over all runs (per doubling of the
  values), with a 95% bootstrap interval;
- P(monotonic): the share of bootstrap resamples in which the arm means strictly increase with the
  values (1.0 = every resample rises at every step);
- the largest arm's mean / the baseline arm's mean, with a 95% bootstrap interval.
The bootstrap resamples the seeds of each arm with replacement (fixed RNG seed, so the figures are
reproducible). With 3 seeds per arm it is coarse: the interval says how far the seeds disagree,
not a guarantee.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import sys
from pathlib import Path

from launch.sweep.spec import load_sweep
from launch.sweep.summary import mean_std


def ols_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("the arms need at least two different numbers of values for a slope")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated q-quantile (0..1) of sorted values."""
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def trend(
    groups: list[tuple[int, list[float]]], baseline: list[float] | None, boot: int, seed: int = 0
) -> dict:
    """groups: (values, per-seed metric) per arm, any order. Slope per doubling, P(monotonic) and the
    largest arm / baseline ratio, each with its bootstrap distribution summarised."""
    groups = sorted(groups, key=lambda g: g[0])
    if any(len(ys) == 0 for _, ys in groups):
        raise ValueError("every arm needs at least one finished run")

    def stats(gs: list[list[float]], base: list[float] | None) -> tuple[float, bool, float | None]:
        xs = [math.log2(v) for (v, _), ys in zip(groups, gs) for _ in ys]
        slope = ols_slope(xs, [y for ys in gs for y in ys])
        means = [statistics.fmean(ys) for ys in gs]
        rising = all(a < b for a, b in zip(means, means[1:]))
        ratio = None
        if base is not None:
            b = statistics.fmean(base)
            ratio = means[-1] / b if b else float("inf")
        return slope, rising, ratio

    slope, rising, ratio = stats([ys for _, ys in groups], baseline)
    rng = random.Random(seed)
    slopes, rises, ratios = [], 0, []
    for _ in range(boot):
        gs = [[rng.choice(ys) for _ in ys] for _, ys in groups]
        base = [rng.choice(baseline) for _ in baseline] if baseline else None
        s, r, q = stats(gs, base)
        slopes.append(s)
        rises += r
        if q is not None:
            ratios.append(q)
    slopes.sort()
    ratios.sort()

    def described(ys: list[float]) -> dict:
        mean, std = mean_std(ys)
        return {"runs": ys, "mean": mean, "std": std}

    out = {
        "arms": [{"values": v, **described(ys)} for v, ys in groups],
        "slope_per_doubling": slope,
        "slope_ci95": [percentile(slopes, 0.025), percentile(slopes, 0.975)] if boot else None,
        "means_rise": rising,
        "p_monotonic": rises / boot if boot else None,
        "boot": boot,
    }
    if baseline:
        out["baseline"] = described(baseline)
        out["ratio_largest_to_baseline"] = ratio
        out["ratio_ci95"] = [percentile(ratios, 0.025), percentile(ratios, 0.975)] if boot else None
    return out


def read_runs(csv_path: Path, sweep_path: Path, metric: str) -> dict[str, list[tuple[int | None, float]]]:
    """arm -> [(values, metric)] of the finished runs in collect's per-run table."""
    sweep = load_sweep(sweep_path)
    arm_of = {r.name: r.arm for r in sweep.runs}
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise SystemExit(f"{csv_path}: no column {metric!r}; columns: {', '.join(rows[0])}")
    out: dict[str, list[tuple[int | None, float]]] = {}
    for row in rows:
        if row.get("state") != "done" or row.get(metric) in (None, "") or row["run"] not in arm_of:
            continue
        values = int(float(row["values"])) if row.get("values") else None
        out.setdefault(arm_of[row["run"]], []).append((values, float(row[metric])))
    return out


def markdown(result: dict, arms: list[str], baseline: str | None, metric: str) -> str:
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    lines = [
        f"# `{metric}` against the number of memory values",
        "",
        "| arm | values | runs | mean ± std |",
        "|---|---|---|---|",
    ]
    for name, a in zip(arms, result["arms"]):
        lines.append(f"| {name} | {a['values']:,} | {fmt(a['runs'])} | {a['mean']:.3f} ± {a['std']:.3f} |")
    if baseline:
        b = result["baseline"]
        lines.append(f"| {baseline} (baseline) | — | {fmt(b['runs'])} | {b['mean']:.3f} ± {b['std']:.3f} |")
    lo, hi = result["slope_ci95"]
    lines += [
        "",
        f"- Slope per doubling of the values (least squares over all runs): **{result['slope_per_doubling']:+.4f}** (95% bootstrap interval {lo:+.4f} … {hi:+.4f}).",
        f"- Arm means rise at every step: **{'yes' if result['means_rise'] else 'no'}**; P(monotonic) over {result['boot']:,} bootstrap resamples of the seeds: **{result['p_monotonic']:.2f}**.",
    ]
    if baseline:
        rlo, rhi = result["ratio_ci95"]
        lines.append(
            f"- Largest arm / {baseline}: **{result['ratio_largest_to_baseline']:.2f}×** (95% bootstrap interval {rlo:.2f}× … {rhi:.2f}×)."
        )
    lines.append(
        "\nBootstrap: each arm's seeds resampled with replacement (RNG seed 0); with 3 seeds per arm it is coarse."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", required=True, type=Path, help="collect's per-run table (PREFIX.csv)")
    ap.add_argument("--sweep", required=True, type=Path, help="the sweep file (maps runs to arms)")
    ap.add_argument("--arms", required=True, help="comma-separated memory arms (any order: sorted by values)")
    ap.add_argument("--baseline", help="an arm to compare the largest against (e.g. the equal-active dense)")
    ap.add_argument("--metric", default="facts_seen/exact_match")
    ap.add_argument("--boot", type=int, default=20000)
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    if args.boot < 1:
        raise SystemExit(f"--boot {args.boot}: the report's intervals need at least one bootstrap resample")
    runs = read_runs(args.csv, args.sweep, args.metric)
    arms = args.arms.split(",")
    missing = [a for a in arms + ([args.baseline] if args.baseline else []) if not runs.get(a)]
    if missing:
        raise SystemExit(
            f"no finished runs of {', '.join(missing)} in {args.csv}; arms with finished runs: {', '.join(runs)}"
        )
    no_values = [a for a in arms if any(v is None for v, _ in runs[a])]
    if no_values:
        raise SystemExit(
            f"{', '.join(no_values)}: not memory arms (no `values` column); pass them as --baseline"
        )
    groups = [(runs[a][0][0], [m for _, m in runs[a]]) for a in arms]
    order = sorted(range(len(arms)), key=lambda i: groups[i][0])
    arms = [arms[i] for i in order]
    result = trend(groups, [m for _, m in runs[args.baseline]] if args.baseline else None, args.boot)
    result.update(metric=args.metric, arm_names=arms, baseline_arm=args.baseline)
    md = markdown(result, arms, args.baseline, args.metric)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(md)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
