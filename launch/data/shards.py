"""Token shards: a tokenized corpus on disk, read through `np.memmap`.

A shard directory holds
  index.json          what the shards are: dtype, token and document counts, the tokenizer's sha256,
                      the source files (path, size, mtime) and options they were made from
  shard_NNNNN.bin     flat token ids (uint16 when the vocabulary fits, else uint32); the corpus is
                      their concatenation, documents (BOS + pieces + EOS) back to back
  documents.bin       int64 start offset of every document in that concatenation
  counts.bin          int64 count of every token id (the unigram baseline without reading the corpus)
  tokenizer.model     a copy of the tokenizer, so the directory is self-describing

Opening checks the index against the files (sizes, and a hash of each shard's first and last 4 KiB)
in time independent of the corpus size; the tokens themselves are only paged in when read, and
every process mapping the same files shares one copy in the OS page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.runtime.errors import UserError

FORMAT = "memscale-token-shards"
VERSION = 1
INDEX = "index.json"
DOCUMENTS = "documents.bin"
COUNTS = "counts.bin"
TOKENIZER = "tokenizer.model"
_PROBE = 4096


class ShardError(UserError):
    """A shard directory that is missing, damaged, or does not match what it is used with."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's model file: two tokenizers with equal fingerprints encode alike."""
    return file_sha256(tokenizer.path)


def dtype_for(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 when every id fits, else uint32; an explicit uint16 that cannot hold the vocabulary is an error."""
    if dtype not in ("auto", "uint16", "uint32"):
        raise UserError(f"dtype={dtype!r}: expected auto, uint16 or uint32")
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise UserError(
            f"dtype=uint16 cannot hold a vocabulary of {vocab_size} ids (at most 65536): use uint32 or auto"
        )
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    return np.dtype(dtype)


def probe(path: Path) -> str:
    """Hash of a file's first and last 4 KiB: catches a swapped or rewritten shard without reading it all."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_PROBE)
        f.seek(max(0, size - _PROBE))
        tail = f.read(_PROBE)
    return hashlib.sha256(head + tail + str(size).encode()).hexdigest()[:16]


def source_records(files: list[Path]) -> list[dict]:
    """What a change to the inputs is detected by: resolved path, size and mtime of every file."""
    out = []
    for p in files:
        st = p.stat()
        out.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


class TokenShards:
    """A corpus of token ids as one logical array over memory-mapped shards (or in-memory arrays)."""

    def __init__(self, arrays: list[np.ndarray], index: dict | None = None, directory: Path | None = None):
        self.arrays = [a for a in arrays if len(a)]
        self.index, self.directory = index or {}, directory
        lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # shard k holds [offsets[k], offsets[k+1])
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(np.int64)

    @classmethod
    def in_memory(cls, tokens: np.ndarray) -> TokenShards:
        return cls([np.asarray(tokens)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenation, as int64."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) outside a corpus of {len(self)}")
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            end = min(stop, int(self.offsets[k + 1]))
            out[pos - start : end - start] = self.arrays[k][pos - self.offsets[k] : end - self.offsets[k]]
            pos, k = end, k + 1
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64: the window of `length` tokens at each start."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(self.arrays) == 1:  # one shard: one vectorised gather (reads only the touched pages)
            return self.arrays[0][starts[:, None] + np.arange(length)].astype(np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, s in enumerate(starts):
            out[row] = self.read(int(s), int(s) + length)
        return out

    def __getitem__(self, i: int) -> int:
        i = i + len(self) if i < 0 else i
        return int(self.read(i, i + 1)[0])

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """Occurrences of every token id: from counts.bin when written, else counted in chunks."""
        if self.directory is not None and (self.directory / COUNTS).is_file():
            counts = np.fromfile(self.directory / COUNTS, dtype=np.int64)
            if len(counts) >= vocab_size:
                return counts[:vocab_size]
            return np.pad(counts, (0, vocab_size - len(counts)))
        counts = np.zeros(vocab_size, dtype=np.int64)
        for a in self.arrays:
            for i in range(0, len(a), 1 << 24):
                counts += np.bincount(a[i : i + (1 << 24)], minlength=vocab_size)[:vocab_size]
        return counts

    def document_starts(self) -> np.ndarray:
        """Start offset of every document (memory-mapped; empty when unknown)."""
        if self.directory is None or not self.index.get("documents"):
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self.directory / DOCUMENTS, dtype=np.int64, mode="r")

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's tokens (BOS + pieces + EOS), in order."""
        starts = self.document_starts()
        for i in range(len(starts)):
            end = int(starts[i + 1]) if i + 1 < len(starts) else len(self)
            yield self.read(int(starts[i]), end)


def read_index(directory: Path) -> dict:
    try:
        index = json.loads((directory / INDEX).read_text())
    except FileNotFoundError:
        raise ShardError(f"{directory}: no {INDEX} (not a token shard directory, or not finished)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{directory / INDEX}: unreadable index ({str(e).splitlines()[0]})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{directory / INDEX}: not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ShardError(
            f"{directory / INDEX}: index version {index.get('version')}, this code reads {VERSION}"
        )
    return index


def open_shards(
    directory: str | os.PathLike, fingerprint: str | None = None, vocab_size: int | None = None
) -> TokenShards:
    """Map a shard directory, checking it against its index (and against `fingerprint`, the
    sha256 of the tokenizer it must have been made with, and `vocab_size`, the model's: every
    shard's recorded largest id must be below it). Any mismatch raises `ShardError`."""
    directory = Path(directory)
    index = read_index(directory)
    try:
        dtype = np.dtype(index["dtype"])
        if fingerprint is not None and index["tokenizer_sha256"] != fingerprint:
            raise ShardError(
                f"{directory} was tokenized with another tokenizer (sha256 {index['tokenizer_sha256'][:12]}…, "
                f"not {fingerprint[:12]}…): use the tokenizer.model saved in it, or re-tokenize"
            )
        arrays = []
        for shard in index["shards"]:
            path = directory / shard["file"]
            expected = int(shard["tokens"]) * dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                got = "missing" if size is None else f"{size} bytes"
                raise ShardError(
                    f"{path}: {got}, but {INDEX} says {expected} bytes (truncated or not from this index)"
                )
            if probe(path) != shard["probe"]:
                raise ShardError(f"{path}: contents do not match {INDEX} (rewritten or from another run)")
            # Indexes written before max_id was recorded are not checked (reading every id would cost
            # a pass over the corpus at every start).
            if vocab_size is not None and int(shard.get("max_id", -1)) >= vocab_size:
                raise ShardError(
                    f"{path}: holds token id {shard['max_id']}, outside the model's vocabulary of {vocab_size} "
                    f"(model.vocab_size): tokenized with a larger tokenizer; re-tokenize or match model.vocab_size"
                )
            arrays.append(np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype))
        for name, n in ((DOCUMENTS, index["documents"]), (COUNTS, index["vocab_size"])):
            path = directory / name
            if not path.is_file() or path.stat().st_size != 8 * int(n):
                raise ShardError(f"{path}: missing or truncated (expected {8 * int(n)} bytes)")
        if sum(int(s["tokens"]) for s in index["shards"]) != index["tokens"]:
            raise ShardError(f"{directory / INDEX}: shard token counts do not add up to {index['tokens']}")
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{directory / INDEX}: malformed index ({type(e).__name__}: {e})") from None
    return TokenShards(arrays, index, directory)


@dataclass
class ShardWriter:
    """Appends tokenized documents into shards of `shard_tokens` tokens in `directory` (a temporary
    directory: `finish` writes the index last, and `commit` renames it into place)."""

    directory: Path
    dtype: np.dtype
    vocab_size: int
    shard_tokens: int

    def __post_init__(self):
        self.directory.mkdir(parents=True)
        self.shards: list[dict] = []
        self.tokens = self.n_docs = 0
        self.counts = np.zeros(self.vocab_size, dtype=np.int64)
        self._docs = open(self.directory / DOCUMENTS, "wb")  # noqa: SIM115  (open across add() calls; closed by finish/abort)
        self._file = None
        self._in_shard = 0

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"shard_{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file, self._in_shard = open(self.directory / name, "wb"), 0  # noqa: SIM115  (closed by _close_shard)

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["tokens"] = self._in_shard
            self.shards[-1]["probe"] = probe(self.directory / self.shards[-1]["file"])
            self._file = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray, first: np.ndarray | None = None) -> None:
        """Append documents: `tokens` their concatenation, `lengths` their token counts. With
        `first` (a mask), the pieces are segments and only those marked start a document."""
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            bad = int(tokens.max()) if int(tokens.max()) >= self.vocab_size else int(tokens.min())
            raise ShardError(f"token id {bad} outside the tokenizer's vocabulary of {self.vocab_size}")
        starts = self.tokens + np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
        if first is not None:
            starts = starts[first]
        _write(self._docs, starts.astype(np.int64))
        self.n_docs += len(starts)
        self.counts += np.bincount(tokens, minlength=self.vocab_size)[: self.vocab_size]
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._next_shard()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            if take:  # the largest id in each shard: checked against the model's vocabulary on open
                shard = self.shards[-1]
                shard["max_id"] = max(shard.get("max_id", -1), int(tokens[:take].max()))
            _write(self._file, tokens[:take])
            self._in_shard += take
            self.tokens += take
            tokens = tokens[take:]

    def finish(self, metadata: dict) -> dict:
        self._close_shard()
        self._docs.close()
        with open(self.directory / COUNTS, "wb") as f:
            _write(f, self.counts)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokens": self.tokens,
            "documents": self.n_docs,
            "shard_tokens": self.shard_tokens,
            "shards": self.shards,
            **metadata,
        }
        (self.directory / INDEX).write_text(json.dumps(index, indent=1))
        return index

    def abort(self) -> None:
        for f in (self._file, self._docs):
            if f is not None:
                f.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def commit_directory(tmp: Path, out: Path) -> None:
    """Move a finished `tmp` directory to `out`, replacing an older one there. A crash leaves
    either the old directory or none (re-made on the next run), never a half-written one."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write(f, array: np.ndarray) -> None:
    """`array`'s bytes to the open file `f`. Not numpy's `tofile`: on a full disk or past `ulimit -f` it
    raises a bare "N requested and M written" with no errno and no file name, which no caller can tell
    from a bug; a file's own write raises ENOSPC or EFBIG, which the commands turn into one line."""
    try:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    except OSError as e:
        if e.filename is None:  # a file object's error does not say which file
            e.filename = getattr(f, "name", None)
        raise
