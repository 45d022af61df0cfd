"""Tokenize a corpus into token shards:
`python -m launch.tokenize data=PATH|GLOB|shakespeare out=DIR tokenizer=tokenizer.model [workers=N]`.

The work (parallel encoding, shard writing, the index that makes a re-run a no-op) is
`launch.data.tokenize_corpus`; training the tokenizer is `python -m launch.tokenizer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from launch.data.shards import read_index
from launch.data.sources import open_source
from launch.data.tokenize_corpus import (
    DEFAULT_SHARD_TOKENS,
    Inputs,
    default_workers,
    ensure_shards,
    remove_stale_temps,
)
from launch.data.tokenizer import Tokenizer
from launch.runtime.errors import UserError


@dataclass
class TokenizeArgs:
    # PATH, directory or GLOB of .txt/.jsonl/.parquet/.csv/.arrow (optionally .gz/.zst), shakespeare,
    # a save_to_disk directory [DIR:SPLIT], or a hub dataset hf://NAME[/CONFIG][:SPLIT][@REVISION]
    data: str = ""
    out: str = ""  # output shard directory
    tokenizer: str = ""  # sentencepiece .model (make one with python -m launch.tokenizer)
    workers: int = 0  # tokenizer processes; 0: one per CPU core
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per shard file
    format: str = "auto"  # auto | text | jsonl | parquet | csv | arrow
    text_field: str = "text"  # JSONL key / Parquet, CSV or dataset column holding the text
    encoding_errors: str = "strict"  # strict: refuse non-UTF-8 text | replace: decode with U+FFFD
    # train | val: which split of the bundled corpus when data=shakespeare, and which split of a dataset
    # that names none (train; val: validation, valid, val or test)
    split: str = "train"
    dtype: str = "auto"  # auto | uint16 | uint32
    progress: bool = True  # progress bar with tokens/s on stderr
    # what separates documents in a .txt file: file (whole file, streamed in chunks) | blank_line | line |
    # any other string, e.g. '<|endoftext|>'
    doc_separator: str = "file"


def main(argv: list[str]) -> int:
    from launch.config import load_config

    args = load_config(argv, TokenizeArgs)
    for key in ("data", "out", "tokenizer"):
        if not getattr(args, key):
            raise UserError(
                f"{key}= is required: python -m launch.tokenize data=PATH|GLOB out=DIR tokenizer=FILE.model"
            )
    if args.workers < 0:
        raise UserError(f"workers={args.workers} must be 0 (one per CPU core) or more")
    out = Path(args.out)
    remove_stale_temps(out.parent, out.name)  # OUT.tmp-PID of a killed run, before the checks below
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file: expected a directory for the shards")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.json").is_file():
        raise UserError(f"out={out} is a non-empty directory without token shards: refusing to overwrite it")
    source = open_source(
        args.data, args.split, args.format, args.text_field, args.encoding_errors, args.doc_separator
    )
    inputs = Inputs(
        source,
        Tokenizer(args.tokenizer),
        args.format,
        args.text_field,
        args.encoding_errors,
        args.shard_tokens,
        args.dtype,
        args.doc_separator,
    )
    workers = args.workers or default_workers()
    start = time.perf_counter()
    if not ensure_shards(inputs, out, workers, args.progress):
        print(f"{out}: up to date ({read_index(out)['tokens']} tokens); nothing to do")
        return 0
    index = read_index(out)
    secs = time.perf_counter() - start
    print(
        f"wrote {out}: {index['tokens']} tokens, {index['documents']} documents, {len(index['shards'])} shard(s) of "
        f"{index['dtype']} in {secs:.1f}s ({index['tokens'] / max(secs, 1e-9):,.0f} tokens/s, {workers} worker(s))"
    )
    return 0


if __name__ == "__main__":
    from launch.runtime.errors import run_cli

    run_cli(main)
