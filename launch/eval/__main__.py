"""Evaluate a checkpoint: `python -m launch.eval checkpoint=CKPT tasks=[...] out=DIR [eval.*=...]`.

A task is `FORMAT:PATH[?shots=PATH][&name=NAME]` (a local JSONL in the public dataset's schema)
or a built-in name (`shakespeare`: validation perplexity on the bundled plays). Prints a Markdown
table (and a sample generation when eval.sample_tokens > 0); with `out=DIR` also writes
DIR/results.json, DIR/results.md and DIR/predictions/NAME.jsonl for generative tasks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launch.checkpoint.load import load_checkpoint
from launch.config import EvalConfig, load_config, validate_eval
from launch.distributed.process_group import destroy, init_distributed
from launch.eval.suite import (
    describe_text_task,
    format_table,
    run_suite,
    sample,
    sample_settings,
    write_results,
)
from launch.eval.tasks import parse_task_specs
from launch.runtime.errors import ConfigError
from launch.runtime.outputs import check_output_dir, output_dir

COMMAND = (
    "launch.eval"  # recorded in launch.runtime.outputs.MARKER: overwrite=true replaces only such outputs
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalArgs:
    checkpoint: str = ""  # checkpoints/step_N dir, or a run dir (its latest checkpoint)
    tasks: list[str] = field(default_factory=list)  # empty: eval.tasks, else the checkpoint's eval.tasks
    out: str | None = None  # None: print only
    overwrite: bool = False  # replace an earlier launch.eval output in a non-empty out
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    progress: bool = True  # progress bars
    eval: EvalConfig = field(default_factory=EvalConfig)


def main(argv: list[str]) -> int:
    args = load_config(argv, EvalArgs)
    if not args.checkpoint:
        raise ConfigError("checkpoint= is required (a run directory or one of its checkpoints/step_N)")
    if args.dtype not in DTYPES:
        raise ConfigError(f"dtype={args.dtype!r}: expected one of {', '.join(DTYPES)}")
    validate_eval(args.eval)
    if args.out:  # the safe-output rule (launch.runtime.outputs), checked now, not after the evaluation
        check_output_dir(args.out, command=COMMAND, overwrite=args.overwrite)
    info = init_distributed(args.device, device_key="device")
    try:
        loaded = load_checkpoint(args.checkpoint, info.device, DTYPES[args.dtype])
        tasks = list(args.tasks or args.eval.tasks or loaded.config.eval.tasks)
        if not tasks:
            raise ConfigError("no tasks: pass e.g. tasks=[shakespeare,piqa:/data/piqa/valid.jsonl]")
        if args.eval.text_stride and not 0 < args.eval.text_stride <= loaded.model.cfg.max_seq_len:
            raise ConfigError(
                f"eval.text_stride={args.eval.text_stride} must be between 1 and model.max_seq_len={loaded.model.cfg.max_seq_len}"
            )
        parse_task_specs(tasks)  # fail on a bad spec before loading anything heavy
        results = run_suite(loaded.model, loaded.tokenizer, tasks, args.eval, info, progress=args.progress)
        text = None
        if args.eval.sample_tokens > 0:
            text = sample(loaded.model, loaded.tokenizer, args.eval, sync=info.world > 1)
        if info.is_main:
            header = {
                "checkpoint": str(loaded.path),
                "step": loaded.step,
                "eval": dataclasses.asdict(args.eval) | {"tasks": tasks},
                "dtype": args.dtype,
            }
            print(format_table({name: r.metrics for name, r in results.items()}), end="", flush=True)
            notes = {
                spec.name: describe_text_task(
                    spec, results[spec.name].metrics, loaded.model.cfg.max_seq_len, args.eval.limit
                )
                for spec in parse_task_specs(tasks)
                if spec.format.kind == "text"
            }
            for note in notes.values():
                print(note, flush=True)
            header["notes"] = notes
            if text is not None:
                print(f"\nsample ({sample_settings(args.eval)}): {args.eval.sample_prompt}{text}", flush=True)
            if args.out:
                # The checkpoint read, not its run: RUN/eval (README, launch.sweep) is a place of its own.
                sources = [loaded.path]
                with output_dir(args.out, command=COMMAND, overwrite=args.overwrite, sources=sources) as tmp:
                    name = write_results(tmp, results, header, text).name
                print(f"wrote {Path(args.out) / name}", flush=True)
    except BaseException:
        destroy(barrier=False)  # a failed rank's peers may be gone: no barrier to hang on or re-fail in
        raise
    destroy()
    return 0


if __name__ == "__main__":
    from launch.distributed.process_group import run_torchrun_cli

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_torchrun_cli(main)  # under torchrun: a lost peer is one line (exit 3), not a gloo traceback
