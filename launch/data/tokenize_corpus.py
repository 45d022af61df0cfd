"""Tokenize a corpus once, in parallel, into memory-mappable token shards (`launch.shards`).

    python -m launch.tokenize data=PATH|GLOB|shakespeare out=DIR tokenizer=tokenizer.model \
        [workers=N] [shard_tokens=134217728] [format=auto] [text_field=text] [encoding_errors=strict]

Documents are read as a stream by this process (`launch.sources`), grouped into batches of about a
megabyte of text, and encoded by N worker processes (`Tokenizer.encode_document`: BOS + pieces +
EOS); results are written in input order, so the shards are byte-identical whatever N is. At most
2N batches are in flight, so memory stays bounded whatever the corpus size. The output is built in
a temporary directory and renamed into place; re-running with unchanged inputs and tokenizer is a
no-op, and a changed file, option or tokenizer re-tokenizes. `python -m launch.train` does the
same automatically (into `data.cache_dir`, default RUN_DIR/data_cache) for sources that are not
shard directories; `data.train=DIR` trains on a directory written by this command.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.data.shards import (
    TOKENIZER,
    ShardError,
    ShardWriter,
    commit_directory,
    dtype_for,
    open_shards,
    read_index,
    source_records,
    tokenizer_fingerprint,
)
from launch.data.sources import iter_documents
from launch.data.tokenizer import Tokenizer
from launch.runtime.errors import UserError

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
_BATCH_CHARS = 1 << 20

_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)


def _encode(texts: list[str], tok: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ids of `texts` (each BOS + pieces + EOS) and each one's length."""
    tok = tok or _worker_tokenizer
    docs = [tok.encode_document(t) for t in texts]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((i for d in docs for i in d), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(
    batches: Iterator[list[str]], tok: Tokenizer, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in input order; with workers > 1, encoded by a process pool with a bounded
    number of batches in flight (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        for b in batches:
            yield _encode(b, tok)
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.path),)) as pool:
        pending: deque = deque()
        for b in batches:
            pending.append(pool.apply_async(_encode, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class Inputs:
    """What a shard directory is made from; equal inputs give identical shards."""

    files: list[Path]
    tokenizer: Tokenizer
    fmt: str = "auto"
    text_field: str = "text"
    encoding_errors: str = "strict"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    dtype: str = "auto"

    def metadata(self) -> dict:
        return {
            "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
            "bos_id": self.tokenizer.bos_id,
            "eos_id": self.tokenizer.eos_id,
            "documents_are": "BOS + pieces + EOS",
            "sources": source_records(self.files),
            "options": {
                "format": self.fmt,
                "text_field": self.text_field,
                "encoding_errors": self.encoding_errors,
            },
        }


def up_to_date(out: Path, inputs: Inputs) -> str | None:
    """None when `out` holds intact shards of exactly `inputs`; else why it must be (re)made."""
    try:
        index = read_index(out)
    except ShardError as e:
        return str(e)
    want = inputs.metadata()
    for key in ("tokenizer_sha256", "sources", "options"):
        if index.get(key) != want[key]:
            return f"{key.replace('_sha256', '')} changed"
    if (
        index.get("shard_tokens") != inputs.shard_tokens
        or index.get("dtype") != dtype_for(inputs.tokenizer.vocab_size, inputs.dtype).name
    ):
        return "shard layout changed"
    try:
        open_shards(out)
    except ShardError as e:
        return str(e)
    return None


def tokenize_files(
    inputs: Inputs, out: Path, workers: int = 1, progress: bool = False, made_by: str = "launch.tokenize"
) -> dict:
    """Tokenize `inputs` into shard directory `out` (atomically replacing it). Returns the index."""
    tok = inputs.tokenizer
    dtype = dtype_for(tok.vocab_size, inputs.dtype)
    if inputs.shard_tokens < 1:
        raise UserError(f"shard_tokens={inputs.shard_tokens} must be at least 1")
    metadata = inputs.metadata()  # before reading: a file changed during the run is re-read next time
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, dtype, tok.vocab_size, inputs.shard_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            desc=f"tokenize {out.name}", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr
        )
    start = time.perf_counter()
    try:
        docs = iter_documents(inputs.files, inputs.fmt, inputs.text_field, inputs.encoding_errors)
        for flat, lengths in _encoded(_batches(docs), tok, workers):
            writer.add(flat, lengths)
            if bar is not None:
                bar.update(len(flat))
        if writer.tokens == 0:
            raise UserError(f"{', '.join(map(str, inputs.files[:3]))}: no text (every document is empty)")
        shutil.copyfile(tok.path, tmp / TOKENIZER)
        index = writer.finish(
            {**metadata, "made_by": made_by, "seconds": round(time.perf_counter() - start, 3)}
        )
        commit_directory(tmp, out)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return index


def ensure_shards(
    inputs: Inputs, out: Path, workers: int = 1, progress: bool = False, made_by: str = "launch.tokenize"
) -> bool:
    """Make `out` hold the shards of `inputs`, re-tokenizing only when it does not. True if it tokenized."""
    reason = up_to_date(out, inputs)
    if reason is None:
        return False
    if out.exists():
        print(f"re-tokenizing {out}: {reason}", file=sys.stderr, flush=True)
    tokenize_files(inputs, out, workers, progress, made_by)
    return True


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
