"""The quickstart: Memory+ beside its dense twin, in a few minutes on 2 CPU cores.
`python -m launch.quickstart [out=runs/quickstart] [seeds=[0]] [dtype=auto] [steps=N]`

1. writes a seeded synthetic fact corpus and its tokenizer (`launch.facts`) to OUT/facts;
2. trains two models on the bundled plays mixed with those facts (configs/quickstart/): the dense
   twin (every FFN kept) and Memory+ (block 1's FFN replaced by a gated product-key memory of 65k
   values), at equal active parameters per token, per seed, into OUT/runs/ARM_seed-S;
3. evaluates both (fact recall on the training question phrasings, and one sample each);
4. writes OUT/report (launch.report: report.md, loss curves and the other PNGs) and prints one
   side-by-side table whose every number is read from the runs' metrics.jsonl and eval results.

A re-run reuses finished runs (the trainer resumes them and finds them done) and reprints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from launch.config import EvalConfig, load_config
from launch.data.facts import FactsArgs, mixture_tokenizer, write_corpus
from launch.eval.suite import sample_settings
from launch.report.runs import mean_std
from launch.report.write import report_rows, write_report
from launch.runtime.errors import ConfigError, UserError, run_cli
from launch.runtime.hardware import auto_dtype

EVAL_KEYS = {f.name for f in fields(EvalConfig)}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
ARMS = {"dense": "dense twin", "memory": "Memory+"}
TASK = "facts_seen"
USAGE = (
    "usage: python -m launch.quickstart [out=runs/quickstart] [seeds=[0]] [dtype=auto|fp32|bf16] [steps=N]"
)


@dataclass
class QuickstartArgs:
    out: str = "runs/quickstart"  # the facts, the runs, the report and the table land here
    # training seeds; each trains both arms (README's figures: seeds=[0,1,2])
    seeds: list[int] = field(default_factory=lambda: [0])
    # auto: bf16 where a bf16 matrix unit (AMX-BF16, CUDA) exists and the model is wide enough to use it
    dtype: str = "auto"
    steps: int | None = None  # training steps per run (None: the configs', 600)
    # train the two arms at once, each on half the cores (false: one after the other, each on all cores)
    parallel: bool = True
    n_entities: int = 100  # invented people in the fact corpus (5 facts each)
    sample_tokens: int = 24  # tokens of each model's printed sample (0: none)


def choose_dtype(requested: str) -> tuple[str, str]:
    """(train.dtype, why) for both arms."""
    if requested in ("fp32", "bf16"):
        return requested, "dtype= given"
    if requested != "auto":
        raise ConfigError(f"dtype={requested} is not one of auto, fp32, bf16")
    dtype, why = auto_dtype(load_config([f"config={CONFIGS / 'dense.yaml'}"]).model.dim)
    return dtype, f"auto: {why}"


def facts_corpus(out: Path, n_entities: int) -> Path:
    """OUT/facts, written once per n_entities (a later run with the same settings reuses it)."""
    target = out / "facts"
    meta = target / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("n_entities") == n_entities:
        return target
    args = FactsArgs(out=str(target), n_entities=n_entities, seed=0, repeats=4, overwrite=True)
    write_corpus(args)
    mixture_tokenizer(["shakespeare", str(target / "train.txt")], target / "tokenizer.model", 1024)
    print(f"wrote the fact corpus ({n_entities} people x 5 facts) and its tokenizer to {target}", flush=True)
    return target


def _stream(proc: subprocess.Popen, label: str, log: Path) -> None:
    with log.open("w") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            print(f"[{label}] {line}", end="", flush=True)


def run_together(jobs: dict[str, list[str]], logs: Path, parallel: bool) -> None:
    """Run each job (label -> argv), prefixing its output lines with its label and keeping them in
    LOGS/label.log; at once (each on its share of the cores) or one after the other. A failure is
    one line naming the job and its log."""
    logs.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    threads = max(1, cores // len(jobs)) if parallel else cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    batches = [list(jobs)] if parallel else [[label] for label in jobs]
    for batch in batches:
        procs = {}
        try:
            for label in batch:
                procs[label] = subprocess.Popen(
                    jobs[label], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
                )
            readers = [
                threading.Thread(target=_stream, args=(p, label, logs / f"{label}.log"))
                for label, p in procs.items()
            ]
            for t in readers:
                t.start()
            for t in readers:
                t.join()
        finally:
            for p in procs.values():  # Ctrl-C: the children get it too; wait for their checkpoints
                p.wait()
        for label, p in procs.items():
            if p.returncode != 0:
                raise UserError(
                    f"{label} failed (exit status {p.returncode}); its output is in {logs / label}.log"
                )


def train_command(
    arm: str, seed: int, run_dir: Path, facts: Path, dtype: str, steps: int | None
) -> list[str]:
    overrides = [
        f"run.dir={run_dir}",
        f"run.seed={seed}",
        f"data.tokenizer={facts / 'tokenizer.model'}",
        f"data.mix=[{{path: {facts / 'train.txt'}, ratio: 0.9}}]",
        f"train.dtype={dtype}",
    ]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return [sys.executable, "-m", "launch.train", f"config={CONFIGS / f'{arm}.yaml'}", *overrides]


def first_person(facts: Path) -> dict[str, str]:
    return json.loads((facts / "facts.jsonl").read_text().splitlines()[0])


def sample_prompt(facts: Path) -> str:
    """The start of a biography of the corpus' first person: a continuation that names the right
    city (printed beside the samples) shows a fact recalled."""
    return f"{first_person(facts)['name']} was born in the city of"


def eval_command(run_dir: Path, facts: Path, sample_tokens: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.eval",
        f"checkpoint={run_dir}",
        f"tasks=[facts:{facts / 'qa_seen.jsonl'}?name={TASK}]",
        f"out={run_dir / 'eval'}",
        "overwrite=true",
        "progress=false",
        "eval.max_new_tokens=8",
        "eval.batch_size=250",
        f"eval.sample_tokens={sample_tokens}",
        f"eval.sample_prompt={sample_prompt(facts)}",
    ]


# -- the table -------------------------------------------------------------------------------

ROWS = (
    ("parameters (total)", "params", "{:,.0f}"),
    ("parameters active per token", "active_params", "{:,.0f}"),
    ("validation perplexity (plays)", "final_val_ppl", "{:.1f}"),
    ("fact recall (exact match)", f"{TASK}/exact_match", "{:.3f}"),
    ("tokens/s (median window)", "tokens_per_s", "{:,.0f}"),
    ("peak memory (MB)", "peak_mem_mb", "{:,.0f}"),
    ("training wall time (s)", "wall_s", "{:.0f}"),
)


def _cell(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(values) > 1 and std else "")


def by_arm(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}


def table(rows: list[dict[str, Any]]) -> str:
    arms = by_arm(rows)
    n = len(next(iter(arms.values())))
    head = (
        f"| {'(mean ± std over ' + str(n) + ' seeds)' if n > 1 else ''} | " + " | ".join(ARMS.values()) + " |"
    )
    lines = [head, "|---|" + "---:|" * len(ARMS)]
    for name, key, fmt in ROWS:
        lines.append(
            f"| {name} | " + " | ".join(_cell([r.get(key) for r in arms[a]], fmt) for a in ARMS) + " |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> str:
    """Who is ahead on recall and perplexity, stated only as far as the seeds carry it."""
    arms = by_arm(rows)
    parts = []
    for name, key, better in (
        ("fact recall", f"{TASK}/exact_match", max),
        ("validation perplexity", "final_val_ppl", min),
    ):
        d = [r.get(key) for r in arms["dense"]]
        m = [r.get(key) for r in arms["memory"]]
        if None in d or None in m or not d:
            continue
        ahead = sum(better(a, b) == a and a != b for a, b in zip(m, d))
        parts.append(f"Memory+ is ahead on {name} in {ahead} of {len(m)} seed(s)")
    seeds = len(arms["memory"])
    caveat = "" if seeds > 1 else " (one seed; seeds=[0,1,2] measures the spread, README lists it)"
    return "; ".join(parts) + caveat if parts else "no comparison: a run has no results"


def samples(rows: list[dict[str, Any]], runs: Path, facts: Path) -> list[str]:
    """The first seed's sample of each arm, with the prompt and decoding settings it was made with."""
    out = []
    for arm, label in ARMS.items():
        first = next((r for r in rows if r["arm"] == arm), None)
        path = runs / first["run"] / "eval" / "results.json" if first else None
        if not (path and path.is_file()):
            continue
        results = json.loads(path.read_text())
        if text := results.get("sample"):
            settings = EvalConfig(**{k: v for k, v in results["eval"].items() if k in EVAL_KEYS})
            if not out:
                truth = first_person(facts)["birth_city"]
                out.append(
                    f"samples ({sample_settings(settings)}), prompt {settings.sample_prompt!r} (true city: {truth}):"
                )
            out.append(f"  {label:>10}: {' '.join(text.split())}")
    return out


def main(argv: list[str]) -> int:
    args = load_config(argv, QuickstartArgs, usage=USAGE)
    if not args.seeds:
        raise ConfigError("seeds= is empty: give at least one seed, e.g. seeds=[0]")
    dtype, why = choose_dtype(args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = facts_corpus(out, args.n_entities)
    runs = out / "runs"
    print(f"training dense twin and Memory+ in {dtype} ({why}), seeds {args.seeds}", flush=True)
    names = [f"{arm}_seed-{s}" for s in args.seeds for arm in ARMS]
    for seed in args.seeds:
        jobs = {
            f"{arm}_seed-{seed}": train_command(
                arm, seed, runs / f"{arm}_seed-{seed}", facts, dtype, args.steps
            )
            for arm in ARMS
        }
        run_together(jobs, out / "logs", args.parallel)
    evals = {f"eval_{n}": eval_command(runs / n, facts, args.sample_tokens) for n in names}
    run_together(evals, out / "logs", args.parallel)
    report = write_report(
        [runs / n for n in names], out / "report", title="quickstart: dense twin vs Memory+"
    )
    rows = report_rows([runs / n for n in names])
    text = table(rows)
    lines = [
        "",
        text,
        "",
        verdict(rows),
        f"dtype {dtype} ({why}); fact recall: exact match on {facts / 'qa_seen.jsonl'}",
        *samples(rows, runs, facts),
        f"report, loss curves and slot reads: {report}",
    ]
    (out / "table.md").write_text(text + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
