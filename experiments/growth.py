"""Depth growth vs training the deep model from scratch (validation loss against steps).

    python -m experiments.growth [--quick] [--out experiments/results] [--work runs/growth_bench] [--jobs 1]

1. Train a base of L layers for `base_steps` on the bundled Shakespeare corpus.
2. Grow it to 2L with every strategy (`launch.grow`) and continue each for B steps (fresh optimizer,
   the base's data position continues).
3. Train the 2L model from scratch for 3B steps with the base's tokenizer (so losses compare).

Reports each run's validation-loss curve, the parameter overhead of growing, and the first step at
which each grown model's validation loss reaches scratch-2L's final loss. All training goes through
`python -m launch.train` subprocesses with `configs/growth/base.yaml`. `--quick` is a tiny smoke
configuration (< 1 min, meaningless numbers). Writes growth.{json,md,png} under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import machine, md_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

BASE_CONFIG = REPO / "configs" / "growth" / "base.yaml"
STRATEGIES = ("scalenet", "stack_copy", "interleave_copy", "llama_pro", "solar_dus")

# Full run: dim 64, L = 4 -> 8, vocab 1024, seq 64, batch 8 (the rest in configs/growth/base.yaml).
FULL = {
    "L": 4,
    "base_steps": 200,
    "budget": 100,  # B: steps after growth; scratch trains 3B
    "val_every": 10,
    "base_lr": 2e-3,
    "continue_lr": 3e-3,  # tried 1e-3, 2e-3, 3e-3 (best); scratch and base use 2e-3
    "continue_warmup": 10,
    # An adapter costs r·(in+out) against in·out for its weight, ~2r/dim per linear: at dim 64 even
    # r = 1 on all seven linears is 3.7% of the base, so the 2% budget allows r = 1 on attention only.
    "grow": {
        "scalenet": {"adapter_rank": 1, "targets": ["wq", "wk", "wv", "wo"]},
        "stack_copy": {},
        "interleave_copy": {},
        "llama_pro": {},
        "solar_dus": {},  # default m = L/4: depth 2L - 2m, SOLAR's recipe (m = 0 would be stack_copy)
    },
    "overrides": [],
}
QUICK = {
    "L": 2,
    "base_steps": 6,
    "budget": 4,
    "val_every": 2,
    "base_lr": 3e-3,
    "continue_lr": 3e-3,
    "continue_warmup": 1,
    "grow": {s: ({"adapter_rank": 1} if s == "scalenet" else {}) for s in STRATEGIES},
    "overrides": [
        "model.dim=32",
        "model.n_heads=2",
        "model.n_kv_heads=2",
        "model.vocab_size=384",
        "model.max_seq_len=32",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.val_sequences=8",
    ],
}


def train(run_dir: Path, config: Path, *overrides: str, threads: int | None = None) -> None:
    """One `python -m launch.train` run; its output goes to RUN_DIR.log."""
    cmd = [sys.executable, "-m", "launch.train", f"config={config}", f"run.dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = run_dir.with_suffix(".log")
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    from launch.train.metrics import read_metrics

    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def seed_cache(src_run: Path, run_dir: Path) -> None:
    # The tokenised corpus is keyed by files and tokenizer: every run here shares the base's.
    if (src_run / "data_cache").is_dir() and not (run_dir / "data_cache").exists():
        shutil.copytree(src_run / "data_cache", run_dir / "data_cache")


def quick_corpus(work: Path) -> list[str]:
    """--quick: a slice of the bundled plays as local files, so tokenising takes no time."""
    from launch.data.sources import load_documents

    paths = []
    for split, chars in (("train", 150_000), ("val", 20_000)):
        text = "\n".join(load_documents("shakespeare", split, "auto", "text"))[:chars]
        path = work / f"quick_{split}.txt"
        path.write_text(text)
        paths.append(f"data.{split}={path}")
    return paths


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    scratch = result["scratch"]["curve"]
    for ax, with_base in zip(axes, (False, True)):
        # Right panel: x = compute in 2L-step equivalents, a base step costing L/2L of one.
        offset = cfg["base_steps"] * 0.5 if with_base else 0
        ax.plot(*zip(*scratch), "k-", lw=2, label="scratch 2L")
        if with_base:  # the base run that every grown model starts from
            ax.plot(
                [s * 0.5 for s, _ in result["base"]["curve"]],
                [v for _, v in result["base"]["curve"]],
                "k:",
                label=f"base L={cfg['L']}",
            )
        for name, run in result["runs"].items():
            xs = [offset + s * run["depth"] / (2 * cfg["L"]) if with_base else s for s, _ in run["curve"]]
            ax.plot(xs, [v for _, v in run["curve"]], "-", label=f"{name} ({run['depth']} layers)")
        ax.axhline(scratch[-1][1], color="gray", ls="--", lw=1)
        ax.axvline((offset if with_base else 0) + cfg["budget"], color="gray", ls=":", lw=1)
        ax.set_xlabel(
            "2L-equivalent steps incl. base training" if with_base else "steps (grown: after growth)"
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    lo = min(v for run in [*result["runs"].values(), result["scratch"]] for _, v in run["curve"])
    hi = max(
        v for _, v in scratch[len(scratch) // 6 :] + [p for r in result["runs"].values() for p in r["curve"]]
    )
    axes[0].set_ylim(lo - 0.05, hi + 0.1)
    fig.suptitle(
        f"Growing L={cfg['L']} to 2L vs scratch 2L (B={cfg['budget']}, scratch 3B={3 * cfg['budget']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_equiv(steps: int | None) -> str:
    return "never (scratch ends above it)" if steps is None else str(steps)


def markdown(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    target = result["scratch"]["final_val_loss"]
    rows = []
    for name, r in result["runs"].items():
        reach = r["steps_to_scratch_final"]
        rows.append(
            {
                "name": name,
                "depth": r["depth"],
                "params": f"{r['params'] / 1e6:.3f}M",
                "over": f"{r['overhead_pct']:.2f}%",
                "at0": f"{r['curve'][0][1]:.3f}",
                "final": f"{r['final_val_loss']:.3f}",
                "reach": "not within B"
                if reach is None
                else f"{reach} ({reach / (3 * cfg['budget']):.0%} of scratch's)",
                "equiv": _fmt_equiv(r["scratch_steps_to_final"]),
            }
        )
    rows.append(
        {
            "name": "scratch 2L",
            "depth": 2 * cfg["L"],
            "params": f"{result['scratch']['params'] / 1e6:.3f}M",
            "over": "—",
            "at0": "—",
            "final": f"{target:.3f}",
            "reach": f"{3 * cfg['budget']} (100%)",
            "equiv": "—",
        }
    )
    table = md_table(
        rows,
        [
            ("run", "{name}"),
            ("layers", "{depth}"),
            ("params", "{params}"),
            ("overhead vs base", "{over}"),
            ("val loss at growth", "{at0}"),
            ("final val loss", "{final}"),
            ("steps to scratch-2L final loss", "{reach}"),
            ("scratch steps to this final loss", "{equiv}"),
        ],
    )
    sn = result["runs"].get("scalenet")
    verdict = ""
    if sn:
        ok_over = sn["overhead_pct"] <= 2.0
        reach = sn["steps_to_scratch_final"]
        ok_steps = reach is not None and reach <= cfg["budget"]
        verdict = (
            f"\n**Target check (ScaleNet):** overhead {sn['overhead_pct']:.2f}% of base "
            f"({'meets' if ok_over else 'misses'} ≤ 2%); reaches scratch-2L's final loss {target:.3f} "
            + (
                f"after {reach} steps ({'meets' if ok_steps else 'misses'} ≤ {cfg['budget']} = a third of scratch's)"
                if reach is not None
                else f"**not** within the {cfg['budget']}-step budget (misses the target)"
            )
            + f". Grown runs also had {cfg['base_steps']} base steps at L layers (≈ {cfg['base_steps'] // 2} "
            "2L-step equivalents) before growth.\n"
        )
    return (
        f"# Depth growth vs scratch\n\n{'**QUICK smoke run: numbers are meaningless.**' + chr(10) * 2 if cfg['quick'] else ''}"
        f"Base: L={cfg['L']} layers trained {cfg['base_steps']} steps (val loss {result['base']['final_val_loss']:.3f}, "
        f"{result['base']['params'] / 1e6:.3f}M params), grown to 2L and continued B={cfg['budget']} steps at "
        f"lr {cfg['continue_lr']:g} (warmup {cfg['continue_warmup']}, cosine); scratch 2L trained 3B={3 * cfg['budget']} "
        f"steps at lr {cfg['base_lr']:g}. Config `configs/growth/base.yaml`{' ' + ' '.join(cfg['overrides']) if cfg['overrides'] else ''}; "
        f"validation every {cfg['val_every']} steps on held-out plays. Machine: {m['cpu']}, {m['cores']} cores "
        f"(shared), torch {m['torch']}; wall time {result['wall_s'] / 60:.1f} min; {time.strftime('%Y-%m-%d')}.\n\n"
        + table
        + verdict
        + "\nOverhead = grown params − base params, as % of the base model (embeddings included). "
        "`solar_dus` uses SOLAR's m = L/4, so it is shallower than 2L (m = 0 would equal `stack_copy`).\n\n"
        "![validation loss](growth.png)\n"
    )


def run_experiment(quick: bool, out: Path, work: Path, jobs: int, tune: dict | None = None) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from launch.checkpoint.load import load_checkpoint
    from launch.config import GrowConfig
    from launch.grow import grow_checkpoint

    spec = dict(QUICK if quick else FULL)
    spec.update({k: v for k, v in (tune or {}).items() if v is not None})
    L, B = spec["L"], spec["budget"]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.time()
    common = [
        *spec["overrides"],
        *(quick_corpus(work) if quick else []),
        f"train.val_every={spec['val_every']}",
        "train.progress=false",
        "train.ckpt_every=0",
        "train.keep_last=1",
    ]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    base_run = work / "base"
    print(f"[growth] base: {L} layers, {spec['base_steps']} steps", flush=True)
    train(
        base_run,
        BASE_CONFIG,
        *common,
        f"model.n_layers={L}",
        f"train.steps={spec['base_steps']}",
        f"optim.lr={spec['base_lr']}",
    )
    base = load_checkpoint(base_run)
    result = {
        "config": {**spec, "quick": quick, "jobs": jobs},
        "machine": machine(),
        "base": {
            "params": base.model.num_params(),
            "final_val_loss": val_curve(base_run)[-1][1],
            "curve": val_curve(base_run),
        },
        "runs": {},
    }

    # Every run below depends only on the base: grow all, then train them (`jobs` at a time).
    grown = {}
    for name in STRATEGIES:
        grown[name] = grow_checkpoint(
            base_run, work / f"grown_{name}", GrowConfig(strategy=name, **spec["grow"][name])
        )
        print(
            f"[growth] {name}: {grown[name].depth} layers, overhead {grown[name].overhead_pct:.2f}%",
            flush=True,
        )
    tasks = {
        f"cont_{name}": (
            Path(s.out) / "config.yaml",
            [
                f"train.steps={B}",
                f"optim.lr={spec['continue_lr']}",
                f"optim.warmup_steps={spec['continue_warmup']}",
            ],
        )
        for name, s in grown.items()
    }
    tasks["scratch"] = (
        BASE_CONFIG,
        [
            f"model.n_layers={2 * L}",
            f"train.steps={3 * B}",
            f"optim.lr={spec['base_lr']}",
            f"data.tokenizer={base_run / 'tokenizer.model'}",
        ],  # the base's tokenizer: comparable losses
    )
    for run in tasks:
        seed_cache(base_run, work / run)
    print(
        f"[growth] training {len(STRATEGIES)} grown runs for B={B} steps and scratch {2 * L} layers for "
        f"{3 * B} steps ({jobs} at a time)",
        flush=True,
    )
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(train, work / run, cfg, *common, *extra, threads=threads)
            for run, (cfg, extra) in tasks.items()
        ]
        for f in futures:
            f.result()

    for name, s in grown.items():
        at0 = evaluate_at_growth(Path(s.out), common, base_run / "data_cache")  # loss before continuing
        curve = [(0, at0), *val_curve(work / f"cont_{name}")]
        result["runs"][name] = {
            "depth": s.depth,
            "mapping": s.mapping,
            "params": s.grown_params,
            "overhead_pct": s.overhead_pct,
            "added_params": s.added_params,
            "adapter_params": s.adapter_params,
            "curve": curve,
            "final_val_loss": curve[-1][1],
        }
    scratch_curve = val_curve(work / "scratch")
    result["scratch"] = {
        "params": load_checkpoint(work / "scratch").model.num_params(),
        "curve": scratch_curve,
        "final_val_loss": scratch_curve[-1][1],
    }
    for r in result["runs"].values():
        r["steps_to_scratch_final"] = first_reaching(r["curve"], result["scratch"]["final_val_loss"])
        # the other direction: how long scratch needs to match what growth reached in B steps
        r["scratch_steps_to_final"] = first_reaching(scratch_curve, r["final_val_loss"])
    result["wall_s"] = time.time() - t0

    out.mkdir(parents=True, exist_ok=True)
    (out / "growth.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "growth.md").write_text(md)
    plot(result, out / "growth.png")
    print(md, flush=True)
    return result


def evaluate_at_growth(ckpt: Path, common: list[str], cache: Path) -> float:
    """Validation loss of a grown checkpoint before any continued training (same data and protocol
    as the trainer's periodic validation)."""
    import torch

    from launch.checkpoint.load import load_checkpoint
    from launch.config import load_config
    from launch.data.stream import PackedSequences, tokenize_source
    from launch.distributed.process_group import DistInfo
    from launch.train.validation import evaluate_loss

    loaded = load_checkpoint(ckpt)
    cfg = load_config([f"config={ckpt}/config.yaml", *[o for o in common if o.startswith("data.")]])
    val = tokenize_source(cfg.data.val, "val", loaded.tokenizer, cache)
    info = DistInfo()
    per_rank_batch = max(1, cfg.data.batch_size // cfg.train.grad_accum)
    loss, _ = evaluate_loss(
        loaded.model,
        PackedSequences(val, cfg.data.seq_len),
        cfg.data.val_sequences,
        per_rank_batch,
        info,
        torch.autocast("cpu", enabled=False),
    )
    return loss if math.isfinite(loss) else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (< 1 min)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--continue-lr", type=float, default=None, help="peak LR after growth")
    ap.add_argument("--budget", type=int, default=None, help="B: steps after growth (scratch: 3B)")
    ap.add_argument("--base-steps", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=None, help="training runs at once (default 1; --quick: 3)")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="run directories (default: OUT/growth_work for "
        "--quick, runs/growth_bench otherwise); wiped first",
    )
    args = ap.parse_args(argv)
    work = args.work or (args.out / "growth_work" if args.quick else REPO / "runs" / "growth_bench")
    tune = {"continue_lr": args.continue_lr, "budget": args.budget, "base_steps": args.base_steps}
    run_experiment(args.quick, args.out, work.absolute(), args.jobs or (3 if args.quick else 1), tune)


if __name__ == "__main__":
    main()
