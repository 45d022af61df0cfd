"""Checkpoint <-> Hugging Face directory.

    python -m launch.convert to-hf checkpoint=CKPT out=HFDIR [max_shard_size=5GB] [dtype=fp32|bf16|fp16] [overwrite=true]
    python -m launch.convert from-hf hf=HFDIR out=CKPT [tokenizer=PATH/tokenizer.model] [overwrite=true]

to-hf: dense and grown checkpoints become a stock LlamaForCausalLM (grown: adapters merged, shared
blocks copied per position); memory checkpoints ship their modeling code (load them with
`AutoModelForCausalLM.from_pretrained(HFDIR, trust_remote_code=True)`). CKPT may be a run dir
(its latest checkpoint).

from-hf: an HF Llama directory becomes a step-0 checkpoint for `launch.train train.init_from=CKPT`,
`launch.grow` and `launch.eval`. Needs the [hf] extra for to-hf only.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.config import HELP_FLAGS, load_config
from launch.runtime.errors import CliExit, UserError, run_cli

USAGE = (
    "usage: python -m launch.convert to-hf checkpoint=CKPT out=HFDIR [max_shard_size=5GB] [dtype=fp32] | "
    "from-hf hf=HFDIR out=CKPT [tokenizer=PATH]"
)


@dataclass
class ToHFArgs:
    checkpoint: str | None = None  # checkpoint dir or run dir (required)
    out: str | None = None  # Hugging Face directory to write (required)
    max_shard_size: str = "5GB"  # split weights into shards above this size
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    overwrite: bool = False  # replace a non-empty out


@dataclass
class FromHFArgs:
    hf: str | None = None  # Hugging Face Llama directory (required)
    out: str | None = None  # checkpoint directory to write (required)
    tokenizer: str | None = None  # sentencepiece model; default HFDIR/tokenizer.model
    overwrite: bool = False  # replace a non-empty out


def _require(args, *keys: str) -> None:
    for key in keys:
        if not getattr(args, key):
            raise UserError(f"missing {key}=...; {USAGE}")


def main(argv: list[str]) -> int:
    if argv and argv[0] in HELP_FLAGS:
        from launch.config.help import help_text

        raise CliExit(help_text(ToHFArgs, f"{USAGE}\n\nto-hf:") + "\n" + help_text(FromHFArgs, "from-hf:"))
    if not argv or argv[0] not in ("to-hf", "from-hf"):
        given = f"unknown command {argv[0]!r}: " if argv and "=" not in argv[0] else ""
        raise UserError(f"{given}expected a command, to-hf or from-hf; {USAGE}")
    command, rest = argv[0], argv[1:]
    if command == "to-hf":
        from launch.convert.export import export_checkpoint

        args = load_config(rest, ToHFArgs)
        _require(args, "checkpoint", "out")
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
        print(f"wrote Hugging Face model to {out}")
    else:
        from launch.convert.import_hf import import_hf

        args = load_config(rest, FromHFArgs)
        _require(args, "hf", "out")
        out = import_hf(args.hf, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"wrote checkpoint to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
