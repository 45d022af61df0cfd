"""Per-rank memory and checkpoint cost of memory parallelism at P = 1, 2, 4 ranks (`python -m benchmarks scale_memory`).

Tiny model + one memory layer of 1M × 512 values (memory.n_keys=1024 memory.v_dim=512, 2 GiB fp32),
row-sparse Adam on the values, FSDP2 on the rest, 2 steps and one checkpoint, at P = 1, 2, 4 ranks on
gloo (torchrun). For each P: peak RSS of every rank, checkpoint bytes each rank wrote (its own
`__<rank>_*.distcp` files) against the logical state, save seconds (sync, and the part an async save
blocks the loop), load seconds (a resume of the same run), and launch.plan's per-rank estimate.
Writes scale_memory.{json,md} under --out. `--quick`: a 64^2-value table (`--n-keys 64`). Measures; asserts nothing.

Each rank runs this module in `rank` mode (torchrun ... -m benchmarks.scale_memory rank OUT_JSON -- TRAIN ARGS), which
runs launch.train in-process with the checkpointer's save/wait/load timed, then records its ru_maxrss.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO, md_table, parser, record, write_record

MODEL = [
    f"config={REPO / 'configs' / 'tiny.yaml'}",
    "memory.layers=[1]",
    "memory.n_keys=1024",
    "memory.v_dim=512",
    "memory.heads=2",
    "memory.k_dim=16",
    "memory.knn=4",
    "memory.value_optimizer=row_sparse_adam",
]
RUN = [
    "train.steps=2",
    "train.ckpt_every=2",
    "train.val_every=0",
    "train.log_every=1",
    "train.progress=false",
]
GB = 1e9


def rank_main(out: Path, argv: list[str]) -> None:
    """One rank: launch.train with the checkpointer timed; writes {rank, rss, seconds} to `out`."""
    from launch.checkpoint import checkpointer as ck
    from launch.train import __main__ as train

    timings = {"save_s": 0.0, "save_blocking_s": 0.0, "wait_s": 0.0, "load_s": 0.0}

    def timed(name, fn):
        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                timings[name] += time.perf_counter() - t0

        return wrapper

    ck.Checkpointer.save = timed("save_s", ck.Checkpointer.save)
    ck.Checkpointer.wait = timed("wait_s", ck.Checkpointer.wait)
    ck.Checkpointer.load = timed("load_s", ck.Checkpointer.load)
    rank = int(os.environ.get("RANK", "0"))
    train.main(argv)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(f"{out}.{rank}").write_text(json.dumps({"rank": rank, "peak_rss": rss, **timings}))


def launch(nproc: int, out: Path, args: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    me = ["-m", "benchmarks.scale_memory", "rank", str(out), "--", *args]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *me,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]


def checkpoint_bytes(step_dir: Path, nproc: int) -> tuple[list[int], int]:
    """(bytes each rank wrote, logical bytes of the saved state from the metadata)."""
    from launch.checkpoint.safe_metadata import read_metadata_file, tensor_entries

    per_rank = [
        sum(p.stat().st_size for p in (step_dir / "state").glob(f"__{r}_*.distcp")) for r in range(nproc)
    ]
    import torch

    entries = tensor_entries(read_metadata_file(step_dir / "state" / ".metadata"))
    logical = sum(
        int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size() for s, d in entries.values()
    )
    return per_rank, logical


def planned(nproc: int) -> int:
    from launch.config import load_config
    from launch.distributed.plan import plan

    cfg = load_config([*MODEL, f"parallel.memory={nproc}", "parallel.data=fsdp"])
    return plan(cfg, nproc)["per_rank_total_bytes"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank"]:
        return rank_main(Path(argv[1]), argv[argv.index("--") + 1 :])
    ap = parser(__doc__)
    ap.add_argument("--n-keys", type=int, default=1024, help="memory.n_keys (values: its square x 512)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_keys = 64
    MODEL[2] = f"memory.n_keys={args.n_keys}"
    work = Path(tempfile.mkdtemp(prefix="scale_memory_"))
    try:
        warm = work / "warm"  # tokenizer and token cache once, shared by every run
        launch(
            1,
            work / "warm.json",
            [
                f"config={REPO / 'configs' / 'tiny.yaml'}",
                f"run.dir={warm}",
                "train.steps=1",
                "train.val_every=0",
                "train.ckpt_every=0",
            ],
        )
        common = [*MODEL, *RUN, f"data.tokenizer={warm / 'tokenizer.model'}"]
        rows = []
        for P in (1, 2, 4):
            layout = [f"parallel.memory={P}", "parallel.data=fsdp"]
            sync_dir, async_dir = work / f"p{P}_sync", work / f"p{P}_async"
            for d in (sync_dir, async_dir):
                shutil.copytree(warm / "data_cache", d / "data_cache")
            t0 = time.perf_counter()
            sync = launch(P, work / f"p{P}_sync.json", [*common, *layout, f"run.dir={sync_dir}"])
            wall = time.perf_counter() - t0
            per_rank, logical = checkpoint_bytes(sync_dir / "checkpoints" / "step_2", P)
            resume = launch(P, work / f"p{P}_load.json", [*common, *layout, f"run.dir={sync_dir}"])
            asyn = launch(
                P,
                work / f"p{P}_async.json",
                [*common, *layout, f"run.dir={async_dir}", "train.async_checkpoint=true"],
            )
            # Unrounded: results keep the precision measured; the Markdown table rounds.
            row = {
                "P": P,
                "peak_rss_gb": [r["peak_rss"] / GB for r in sync],
                "peak_rss_max_gb": max(r["peak_rss"] for r in sync) / GB,
                "planned_state_gb": planned(P) / GB,
                "ckpt_bytes_per_rank": per_rank,
                "ckpt_logical_bytes": logical,
                "ckpt_max_rank_fraction": max(per_rank) / logical,
                "save_s": max(r["save_s"] for r in sync),
                "load_s": max(r["load_s"] for r in resume),
                "resume_peak_rss_max_gb": max(r["peak_rss"] for r in resume) / GB,
                "async_save_blocking_s": max(r["save_s"] for r in asyn),
                "async_wait_s": max(r["wait_s"] for r in asyn),
                "async_peak_rss_max_gb": max(r["peak_rss"] for r in asyn) / GB,
                "run_wall_s": wall,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = rows[0]["peak_rss_max_gb"]
        for r in rows:
            r["rss_vs_p1"] = r["peak_rss_max_gb"] / base
            r["ckpt_gb"] = max(r["ckpt_bytes_per_rank"]) / GB
            r["plan_error"] = r["planned_state_gb"] / r["peak_rss_max_gb"] - 1
        payload = record(
            "scale_memory", args, rows, command="python -m benchmarks scale_memory", model=MODEL, run=RUN
        )
        md = (
            "# Memory parallelism: per-rank memory and checkpoint cost\n\n"
            "Tiny model + 1M × 512 fp32 values (row-sparse Adam), FSDP2 on the rest, 2 steps + one checkpoint, "
            "gloo on CPU (`python -m benchmarks scale_memory`). Peak RSS is each rank's ru_maxrss; checkpoint bytes "
            "are the `__<rank>_*.distcp` files a rank wrote, against the logical state in `.metadata`; plan is "
            "`launch.plan`'s per-rank params+grads+optimizer (no runtime or activations).\n\n"
            + md_table(
                rows,
                [
                    ("P", "{P}"),
                    ("peak RSS max rank (GB)", "{peak_rss_max_gb:.3f}"),
                    ("vs P=1", "{rss_vs_p1:.3f}"),
                    ("plan (GB)", "{planned_state_gb:.3f}"),
                    ("plan vs RSS", "{plan_error:.3f}"),
                    ("ckpt GB, max rank", "{ckpt_gb:.3f}"),
                    ("ckpt fraction of logical", "{ckpt_max_rank_fraction:.4f}"),
                    ("save s (sync)", "{save_s:.2f}"),
                    ("save s blocking (async)", "{async_save_blocking_s:.2f}"),
                    ("async commit wait s", "{async_wait_s:.2f}"),
                    ("async peak RSS (GB)", "{async_peak_rss_max_gb:.3f}"),
                    ("load s", "{load_s:.2f}"),
                ],
            )
            + f"\nMachine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, shared with other jobs "
            "(seconds are indicative).\n"
        )
        write_record(payload, md, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
