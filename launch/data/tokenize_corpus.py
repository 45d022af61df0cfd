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

import contextlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.data.rows import Segment
from launch.data.shards import (
    TOKENIZER,
    ShardError,
    ShardWriter,
    commit_directory,
    dtype_for,
    open_shards,
    read_index,
    tokenizer_fingerprint,
)
from launch.data.sources import FileSource, Source
from launch.data.tokenizer import Tokenizer
from launch.runtime.debris import remove_dead_temps
from launch.runtime.errors import UserError

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
_BATCH_CHARS = 1 << 20

_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    # The parent owns shutdown: a worker dies quietly on SIGTERM (no traceback, no BrokenPipeError
    # from results it can no longer send) and ignores the terminal's Ctrl-C, which the parent handles.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by the parent while forking
    _worker_tokenizer = Tokenizer(path)


def _encode(
    segments: list[Segment], tok: Tokenizer | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated ids of `segments` (BOS where one starts a document, EOS where one ends it), each
    segment's length, and whether it starts a document."""
    tok = tok or _worker_tokenizer
    encoded = [tok.encode_segment(text, first, last) for text, first, last in segments]
    lengths = np.fromiter((len(d) for d in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter((i for d in encoded for i in d), dtype=np.int64, count=int(lengths.sum()))
    starts = np.fromiter((first for _, first, _ in segments), dtype=bool, count=len(segments))
    return flat, lengths, starts


def _batches(segments: Iterator[Segment]) -> Iterator[list[Segment]]:
    batch, chars = [], 0
    for seg in segments:
        batch.append(seg)
        chars += len(seg[0])
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(
    batches: Iterator[list[Segment]], tok: Tokenizer, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Encoded batches in input order; with workers > 1, encoded by a process pool with a bounded
    number of batches in flight (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        for b in batches:
            yield _encode(b, tok)
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    # SIGTERM is held while the workers start, so none dies in the parent's handler before its own is set.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok.path),))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    with pool:
        pending: deque = deque()
        for b in batches:
            pending.append(pool.apply_async(_encode, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Terminated(UserError):
    """SIGTERM arrived while tokenizing: the partial output is removed and the command exits in one line."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_raises(what: str):
    """Turn SIGTERM into an exception in the main thread while `what` runs, so the `finally`
    clauses remove the temporary directory and the worker pool is shut down before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated(f"SIGTERM while tokenizing {what}: stopped, nothing written (re-run to tokenize it)")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale_temps(directory: Path, prefix: str = "") -> list[Path]:
    """Remove `PREFIX*.tmp-PID` / `.old-PID` directories under `directory` left by processes that no
    longer exist (killed mid-tokenization). A live process's are left alone. Returns what was removed."""
    return remove_dead_temps(directory, re.compile(re.escape(prefix) + r".*\.(?:tmp|old)-(?P<pid>\d+)"))


@dataclass
class Inputs:
    """What a shard directory is made from; equal inputs give identical shards."""

    files: list[Path] | Source  # local files, or any source from `launch.data.sources.open_source`
    tokenizer: Tokenizer
    fmt: str = "auto"
    text_field: str = "text"
    encoding_errors: str = "strict"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    dtype: str = "auto"
    doc_separator: str = "file"

    def __post_init__(self):
        if isinstance(self.files, list):
            self.files = FileSource(
                self.files, self.fmt, self.text_field, self.encoding_errors, self.doc_separator
            )

    @property
    def source(self) -> Source:
        return self.files

    def metadata(self) -> dict:
        return {
            "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
            "bos_id": self.tokenizer.bos_id,
            "eos_id": self.tokenizer.eos_id,
            "documents_are": "BOS + pieces + EOS",
            # files: path, size, mtime; datasets: name, config, split and revision or fingerprint
            "sources": self.source.record(),
            "options": {
                "format": self.fmt,
                "text_field": self.text_field,
                "encoding_errors": self.encoding_errors,
                "doc_separator": self.doc_separator,
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
    """Tokenize `inputs` into shard directory `out` (atomically replacing it). Returns the index.
    SIGTERM meanwhile raises `Terminated` (one line at the command line) after removing the partial
    output; a process killed outright leaves `OUT.tmp-PID`, which the next run here removes."""
    with _sigterm_raises(inputs.source.describe()):
        return _tokenize_files(inputs, out, workers, progress, made_by)


def _tokenize_files(inputs: Inputs, out: Path, workers: int, progress: bool, made_by: str) -> dict:
    tok = inputs.tokenizer
    dtype = dtype_for(tok.vocab_size, inputs.dtype)
    if inputs.shard_tokens < 1:
        raise UserError(f"shard_tokens={inputs.shard_tokens} must be at least 1")
    metadata = inputs.metadata()  # before reading: a file changed during the run is re-read next time
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, dtype, tok.vocab_size, inputs.shard_tokens)
    bar = None
    start = time.perf_counter()
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                desc=f"tokenize {out.name}", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr
            )
        for flat, lengths, starts in _encoded(_batches(inputs.source.segments()), tok, workers):
            writer.add(flat, lengths, starts)
            if bar is not None:
                bar.update(len(flat))
        if writer.tokens == 0:
            raise UserError(f"{inputs.source.describe()}: no text (every document is empty)")
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
