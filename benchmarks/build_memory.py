"""Peak RSS per rank of building a memory model the trainer's way — meta device, `launch.parallelize`,
`materialize` (allocate and initialise this rank's shards only) — at P = 1, 2, 4 under gloo.

Tiny model + a 262,144 × 512 fp32 value table (512 MiB). With the meta build the growth of each rank's
RSS follows its share of the table (1/P) instead of the whole table every rank used to allocate.

    python benchmarks/build_memory.py          # writes results/build_memory.{json,md}
    (one rank: python benchmarks/build_memory.py --rank-run P, under torchrun for P > 1)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OVERRIDES = ["config=configs/memory/tiny_memory.yaml", "memory.n_keys=512", "memory.v_dim=512", "parallel.data=fsdp"]


def rank_run(P: int) -> None:
    import torch
    import torch.distributed as dist

    from launch.models.build import build_model
    from launch.config import load_config
    from launch.distributed.process_group import init_distributed
    from launch.distributed.parallelize import build_layout, materialize, parallelize

    cfg = load_config([*OVERRIDES, f"parallel.memory={P}"])
    info = init_distributed("cpu", "gloo")
    layout = build_layout(cfg, info)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.device("meta"):
        model = build_model(cfg)
    par = materialize(parallelize(model, layout, cfg), torch.device("cpu"), cfg.run.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    local = sum(v.numel() * v.element_size() for v in par.memory.values()) / 2**20
    print(json.dumps({"P": P, "rank": info.rank, "values_local_mib": local, "rss_before_mib": before, "rss_peak_mib": peak}))
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank-run", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.rank_run is not None:
        return rank_run(args.rank_run)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    rows = []
    for P in (1, 2, 4):
        launcher = [sys.executable] if P == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={P}"]
        out = subprocess.run([*launcher, __file__, "--rank-run", str(P)], cwd=repo, env=env, capture_output=True, text=True, check=True)
        ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        rows.append({"P": P, "values_local_mib": ranks[0]["values_local_mib"],
                     "max_rss_growth_mib": max(r["rss_peak_mib"] - r["rss_before_mib"] for r in ranks),
                     "max_rss_peak_mib": max(r["rss_peak_mib"] for r in ranks)})  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "build_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| P | values per rank (MiB) | RSS growth during build+init, largest rank (MiB) | peak RSS (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['P']} | {r['values_local_mib']:.0f} | {r['max_rss_growth_mib']:.0f} | {r['max_rss_peak_mib']:.0f} |" for r in rows]
    (args.out_dir / "build_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
