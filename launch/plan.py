"""Plan a layout before renting the machines: `python -m launch.plan config=FILE world=W [key=value ...]`.

    python -m launch.plan config=configs/memory/7b_memory.yaml parallel.memory=8 parallel.data=fsdp world=64

What is counted and how is `launch.distributed.plan`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from launch.config import load_config, validate
from launch.distributed.plan import plan, render
from launch.runtime.errors import ConfigError, run_cli


def main(argv: list[str]) -> int:
    world, out, rest = 1, None, []
    for arg in argv:
        if arg.startswith("world="):
            try:
                world = int(arg.split("=", 1)[1])
            except ValueError:
                raise ConfigError(f"{arg}: world must be a positive integer (the number of ranks)") from None
            if world < 1:
                raise ConfigError(f"{arg}: world must be a positive integer (the number of ranks)")
        elif arg.startswith("out="):
            out = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    t0 = time.perf_counter()
    cfg = load_config(rest)
    validate(cfg)
    result = plan(cfg, world)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print(render(result))
    print(f"planned in {result['seconds']:.2f} s, nothing allocated")
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
