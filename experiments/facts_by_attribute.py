"""Recall exact match per fact attribute, per arm of a sweep (mean ± std over seeds), with each
attribute's majority-answer floor: which facts a model learned, not only how many.

    python -m experiments.facts_by_attribute --sweep configs/sweeps/capacity_cpu1k.yaml \
        --task facts_seen --qa runs/facts/f1000/qa_seen.jsonl \
        [--out experiments/results/sweep_capacity_cpu1k_by_attribute]

Reads each run's `RUN/eval/predictions/TASK.jsonl` (written by `launch.eval`, one row per question
in the order of the QA file) and the QA file's `attribute` field; runs without predictions are
left out (counted in the `seeds` column). Writes OUT.md and OUT.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from launch.sweep.spec import load_sweep


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def majority_floors(qa: list[dict]) -> dict[str, float]:
    """Per attribute: the EM of always answering its most common answer."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for row in qa:
        answers[row["attribute"]][row["answer"]] += 1
    return {a: c.most_common(1)[0][1] / sum(c.values()) for a, c in answers.items()}


def run_by_attribute(qa: list[dict], predictions: list[dict], where: Path) -> dict[str, float]:
    """One run's EM per attribute; the predictions must be the QA file's questions in order."""
    if len(predictions) != len(qa):
        raise ValueError(
            f"{where}: {len(predictions)} predictions for {len(qa)} questions (another QA file?)"
        )
    hits: dict[str, list[float]] = defaultdict(list)
    for i, (q, p) in enumerate(zip(qa, predictions)):
        if q["question"] != p["question"]:
            raise ValueError(
                f"{where}: row {i} answers {p['question']!r}, the QA file asks {q['question']!r}"
            )
        hits[q["attribute"]].append(float(p["em"]))
    return {a: sum(v) / len(v) for a, v in hits.items()}


def by_attribute(
    sweep_path: Path, task: str, qa_path: Path
) -> tuple[list[str], dict[str, float], list[dict]]:
    sweep = load_sweep(sweep_path)
    qa = read_jsonl(qa_path)
    if not qa or "attribute" not in qa[0]:
        raise ValueError(f"{qa_path}: rows need an 'attribute' field (write it with python -m launch.facts)")
    floors = majority_floors(qa)
    attributes = list(floors)
    per_arm: dict[str, list[dict[str, float]]] = defaultdict(list)
    members: Counter = Counter()
    for run in sweep.runs:
        members[run.arm] += 1
        pred = sweep.run_dir(run) / "eval" / "predictions" / f"{task}.jsonl"
        if pred.is_file():
            per_arm[run.arm].append(run_by_attribute(qa, read_jsonl(pred), pred))
    rows = []
    for arm in dict.fromkeys(r.arm for r in sweep.runs):
        runs = per_arm.get(arm, [])
        row: dict = {"arm": arm, "seeds": f"{len(runs)}/{members[arm]}"}
        for a in [*attributes, "all"]:
            vals = [r[a] if a != "all" else statistics.mean(r.values()) for r in runs]
            row[a] = statistics.mean(vals) if vals else None
            row[f"{a}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        rows.append(row)
    return attributes, floors, rows


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def to_markdown(title: str, attributes: list[str], floors: dict[str, float], rows: list[dict]) -> str:
    cols = [*attributes, "all"]
    out = [f"# {title}\n", "| arm | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    out.append(
        "| majority answer | | "
        + " | ".join(f"{floors[a]:.3f}" for a in attributes)
        + f" | {statistics.mean(floors.values()):.3f} |"
    )
    for r in rows:
        out.append(
            f"| {r['arm']} | {r['seeds']} | " + " | ".join(_pm(r[c], r[f"{c}_std"]) for c in cols) + " |"
        )
    return "\n".join(out) + "\n"


def to_csv(attributes: list[str], floors: dict[str, float], rows: list[dict]) -> str:
    cols = ["arm", "seeds", *[x for a in [*attributes, "all"] for x in (a, f"{a}_std")]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerow({"arm": "majority_answer", **floors, "all": statistics.mean(floors.values())})
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, required=True)
    ap.add_argument(
        "--task", default="facts_seen", help="the eval task name (RUN/eval/predictions/TASK.jsonl)"
    )
    ap.add_argument(
        "--qa", type=Path, required=True, help="the QA file that task read (with 'attribute' per row)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="output prefix (default SWEEP_OUT/by_attribute_TASK)"
    )
    args = ap.parse_args(argv)
    attributes, floors, rows = by_attribute(args.sweep, args.task, args.qa)
    out = args.out or load_sweep(args.sweep).out / f"by_attribute_{args.task}"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"Recall EM per attribute: `{args.task}` of sweep `{args.sweep.stem}` (mean ± std over seeds)"
    md = (
        to_markdown(title, attributes, floors, rows)
        + f"\nCommand: `python -m experiments.facts_by_attribute --sweep {args.sweep} --task {args.task} --qa {args.qa} --out {out}`\n"
    )
    Path(f"{out}.md").write_text(md)
    Path(f"{out}.csv").write_text(to_csv(attributes, floors, rows))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
