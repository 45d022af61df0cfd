"""Peak RSS per rank of building a memory model the trainer's way — meta device, `launch.distributed.parallelize`,
`materialize` (allocate and initialise this rank's shards only) — at P = 1, 2, 4 under gloo.

Tiny model + a 262,144 × 512 fp32 value table (512 MiB). With the meta build the growth of each rank's
RSS follows its share of the table (1/P) instead of the whole table every rank used to allocate.

    python -m benchmarks build_memory          # writes build_memory.{json,md} under --out
    (one rank: python -m benchmarks.build_memory --rank-run P, under torchrun for P > 1)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from benchmarks.harness import REPO, parser, record, write_record

OVERRIDES = [
    "config=configs/memory/tiny_memory.yaml",
    "memory.n_keys=512",
    "memory.v_dim=512",
    "parallel.data=fsdp",
]


def rank_run(P: int) -> None:
    import torch
    import torch.distributed as dist

    from launch.config import load_config
    from launch.distributed.parallelize import build_layout, materialize, parallelize
    from launch.distributed.process_group import init_distributed
    from launch.models.build import build_model

    cfg = load_config([*OVERRIDES, f"parallel.memory={P}"])
    info = init_distributed("cpu", "gloo")
    layout = build_layout(cfg, info)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.device("meta"):
        model = build_model(cfg)
    par = materialize(parallelize(model, layout, cfg), torch.device("cpu"), cfg.run.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    local = sum(v.numel() * v.element_size() for v in par.memory.values()) / 2**20
    print(
        json.dumps(
            {
                "P": P,
                "rank": info.rank,
                "values_local_mib": local,
                "rss_before_mib": before,
                "rss_peak_mib": peak,
            }
        )
    )
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--rank-run", type=int, default=None)
    args = ap.parse_args(argv)
    if args.rank_run is not None:
        return rank_run(args.rank_run)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rows = []
    for P in (1, 2) if args.quick else (1, 2, 4):  # --quick: the same table at P = 1, 2
        launcher = (
            [sys.executable]
            if P == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={P}"]
        )
        out = subprocess.run([*launcher, "-m", "benchmarks.build_memory", "--rank-run", str(P)], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        rows.append({"P": P, "values_local_mib": ranks[0]["values_local_mib"],
                     "max_rss_growth_mib": max(r["rss_peak_mib"] - r["rss_before_mib"] for r in ranks),
                     "max_rss_peak_mib": max(r["rss_peak_mib"] for r in ranks)})  # fmt: skip
    lines = [
        "| P | values per rank (MiB) | RSS growth during build+init, largest rank (MiB) | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['P']} | {r['values_local_mib']:.0f} | {r['max_rss_growth_mib']:.0f} | {r['max_rss_peak_mib']:.0f} |"
        for r in rows
    ]
    write_record(record("build_memory", args, rows), "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
