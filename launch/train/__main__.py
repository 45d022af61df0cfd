"""Pretrain or continue training: `python -m launch.train config=FILE [key=value ...]`, or the same
under `torchrun --nproc_per_node=N -m launch.train ...`. The loop itself is `launch.train.trainer`.
"""

from __future__ import annotations

import os

from launch.config import load_config, validate
from launch.distributed import parallelize as par
from launch.distributed.process_group import destroy, init_distributed
from launch.runtime.run_dir import lock_run_dir
from launch.train.trainer import Trainer
from launch.train.watchdog import collective_timeout_s


def main(argv: list[str]) -> int:
    cfg = load_config(argv, require_config=True)  # no config=: usage, exit 2 (launch.cli_help)
    validate(cfg)
    if cfg.eval.tasks:  # a bad task spec or missing task file fails now, not at the first eval
        from launch.eval.tasks import parse_task_specs

        parse_task_specs(list(cfg.eval.tasks))
    par.check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before joining any process group
    timeout_s = collective_timeout_s(cfg.train.watchdog_s)  # a hung collective fails after the watchdog fires
    info = init_distributed(cfg.train.device, cfg.parallel.backend, timeout_s=timeout_s)
    try:
        lock = lock_run_dir(cfg.run.dir, info)  # one trainer per run dir; dies with the process
        try:
            summary = Trainer(cfg, info).fit()
        finally:
            lock.release()
    except BaseException:
        destroy(barrier=False)  # a failed rank's peers may be gone: no barrier to hang on or re-fail in
        raise
    destroy()
    return summary.get(
        "exit", 0
    )  # REQUEUE_EXIT after a requeue signal's checkpoint (launch.runtime.preemption)


if __name__ == "__main__":
    from launch.distributed.process_group import run_torchrun_cli

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_torchrun_cli(main)
