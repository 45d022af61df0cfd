"""Data: local text/JSONL/Parquet through `datasets`, tokenised, packed, and served as a
deterministic, resumable, rank-sharded stream of global batches.

The stream's position is one integer: the number of global sequences consumed. Epoch e visits
the packed sequences in a permutation seeded by (seed, e). Global batch s is sequences
[s·B, (s+1)·B) of that endless order; rank r of W takes rows [r·B/W, (r+1)·B/W) and splits them
into `grad_accum` micro-batches. So the data a step sees does not depend on the number of
ranks, and a checkpoint saved at one world size resumes exactly at another.

`data.mix` adds sources at fixed ratios (`MixedSequences`): the fraction of training sequences
drawn from each; the position is still the one integer, and the mixture a function of it and the seed.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launch.corpus import shakespeare_files
from launch.errors import UserError
from launch.tokenizer import Tokenizer

_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve_files(source: str, split: str) -> list[Path]:
    """'shakespeare' (bundled corpus) or a local file, directory or glob."""
    if source == "shakespeare":
        return shakespeare_files(split)
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FORMATS)
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        looks_like_hub_name = (
            source.count("/") == 1 and not source.startswith((".", "/", "~")) and not path.suffix and not path.parent.exists()
        )
        if looks_like_hub_name:
            raise UserError(
                f"data source {source!r} is not a local path. This machine is offline: download the "
                f"dataset and point data.train/data.val at the local files (.txt, .jsonl, .parquet)"
            )
        raise UserError(f"data source {source!r} matches no files (expected .txt, .jsonl or .parquet)")
    return files


def _builder(files: list[Path], fmt: str) -> str:
    if fmt != "auto":
        return {"text": "text", "jsonl": "json", "parquet": "parquet"}[fmt]
    kinds = {_FORMATS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(
            f"cannot infer data.format from {sorted({p.suffix for p in files})}: use one of .txt, "
            f".jsonl, .parquet or set data.format"
        )
    return kinds.pop()


def load_documents(source: str, split: str, fmt: str = "auto", text_field: str = "text") -> list[str]:
    """Documents (one string each) of a source. Text files are one document per file."""
    files = resolve_files(source, split)
    builder = _builder(files, fmt)
    if builder == "text":  # a whole file is a document; reading directly keeps its exact bytes
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except Exception as e:
        raise UserError(f"cannot read {', '.join(map(str, files[:3]))} as {builder}: {str(e).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise UserError(
            f"{files[0]}: no column {text_field!r} (data.text_field); columns are {', '.join(ds.column_names)}"
        )
    return [t for t in ds[text_field] if t]


def _fingerprint(files: list[Path], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(tokenizer.path.read_bytes())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tokenize_source(
    source: str, split: str, tokenizer: Tokenizer, cache_dir: Path | None, fmt="auto", text_field="text"
) -> np.ndarray:
    """All documents of a source as one int32 token stream, each document followed by EOS.
    Cached under `cache_dir` keyed by the files and the tokenizer."""
    files = resolve_files(source, split)
    cache = cache_dir / f"{split}-{_fingerprint(files, tokenizer)}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        return np.load(cache)
    docs = load_documents(source, split, fmt, text_field)
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_id)
    tokens = np.asarray(ids, dtype=np.int32)
    if len(tokens) < 2:
        raise UserError(f"data source {source!r} ({split}) is empty after tokenisation")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, tokens)
        os.replace(tmp, cache)
    return tokens


class PackedSequences:
    """Non-overlapping windows of seq_len+1 tokens (inputs and shifted targets) over a stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise UserError(f"corpus has {len(tokens)} tokens: fewer than one sequence of data.seq_len={seq_len}")

    def __len__(self) -> int:
        return self.n

    def get(self, indices: np.ndarray) -> torch.Tensor:
        starts = indices.astype(np.int64)[:, None] * self.seq_len
        return torch.from_numpy(self.tokens[starts + np.arange(self.seq_len + 1)].astype(np.int64))


@dataclass
class MixSource:
    path: str
    ratio: float
    format: str | None = None  # None: data.format
    text_field: str | None = None  # None: data.text_field


def parse_mix(mix: list) -> list[MixSource]:
    """Validate `data.mix` entries ({path, ratio[, format, text_field]}); ratios sum below 1."""
    sources = []
    for i, entry in enumerate(mix or []):
        entry = dict(entry) if hasattr(entry, "items") else entry
        if not isinstance(entry, dict) or "path" not in entry or "ratio" not in entry:
            raise UserError(f"data.mix[{i}] must be a mapping with 'path' and 'ratio' (e.g. {{path: facts/train.txt, ratio: 0.2}}), got {entry!r}")
        unknown = set(entry) - {"path", "ratio", "format", "text_field"}
        if unknown:
            raise UserError(f"data.mix[{i}]: unknown key(s) {', '.join(sorted(unknown))}; valid: path, ratio, format, text_field")
        ratio = entry["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
            raise UserError(f"data.mix[{i}].ratio={ratio!r} must be a fraction strictly between 0 and 1")
        sources.append(MixSource(str(entry["path"]), float(ratio), entry.get("format"), entry.get("text_field")))
    total = sum(s.ratio for s in sources)
    if total >= 1:
        raise UserError(f"data.mix ratios sum to {total:g}: they must leave the main source (data.train) a share above 0")
    return sources


class MixedSequences:
    """Several packed sources behind one index space, in fixed proportions.

    Index space size N is the smallest that holds every source at least once at its ratio
    (N >= n_k / r_k); source k owns round(r_k·N) indices, spread evenly over [0, N), and its j-th
    index reads its sequence j mod n_k (small sources repeat, large ones are covered once per
    pass). The mapping depends on nothing but the sources and ratios, so `BatchStream`'s seeded
    permutation and its one-integer position make the mixture a deterministic, resumable function
    of (seed, position), at any world size.
    """

    def __init__(self, sources: list[PackedSequences], ratios: list[float]):
        if len(sources) != len(ratios) or not sources:
            raise ValueError("need one ratio per source")
        if abs(sum(ratios) - 1) > 1e-6:
            raise ValueError(f"ratios must sum to 1, got {sum(ratios)}")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"sources have different seq_len: {sorted(seq_lens)}")
        self.sources, self.ratios, self.seq_len = sources, ratios, seq_lens.pop()
        n = max(int(np.ceil(len(s) / r)) for s, r in zip(sources, ratios))
        counts = [max(1, round(r * n)) for r in ratios]
        self.n = sum(counts)
        # Slot j of source k sits at (j + 0.5) / count_k along the index space: an even interleave.
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
        owner = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(counts)])
        local = np.concatenate([np.arange(c, dtype=np.int64) % len(s) for c, s in zip(counts, sources)])
        order = np.lexsort((owner, keys))
        self.owner, self.local = owner[order], local[order]

    def __len__(self) -> int:
        return self.n

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return self.owner[indices]

    def get(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        out = torch.empty(len(indices), self.seq_len + 1, dtype=torch.int64)
        owner, local = self.owner[indices], self.local[indices]
        for k, src in enumerate(self.sources):
            rows = np.nonzero(owner == k)[0]
            if len(rows):
                out[torch.from_numpy(rows)] = src.get(local[rows])
        return out


def train_sequences(
    cfg, train_tokens: np.ndarray, tokenizer: Tokenizer, cache_dir: Path | None
) -> PackedSequences | MixedSequences:
    """The training data of a `DataConfig`: data.train packed, mixed with the `data.mix` sources
    (`ratio` = fraction of training sequences drawn from that source; data.train gets the rest)."""
    main = PackedSequences(train_tokens, cfg.seq_len)
    mix = parse_mix(cfg.mix)
    if not mix:
        return main
    extras = [
        PackedSequences(
            tokenize_source(m.path, "train", tokenizer, cache_dir, m.format or cfg.format, m.text_field or cfg.text_field),
            cfg.seq_len,
        )
        for m in mix
    ]
    return MixedSequences([main, *extras], [1 - sum(m.ratio for m in mix), *(m.ratio for m in mix)])


@dataclass
class Batch:
    inputs: torch.Tensor  # (b, T)
    targets: torch.Tensor  # (b, T)


class BatchStream:
    """Endless seeded stream of global batches; this rank's micro-batches of each."""

    def __init__(self, data: PackedSequences | MixedSequences, global_batch: int, rank: int, world: int, grad_accum: int, seed: int):
        if global_batch % (world * grad_accum):
            raise UserError(
                f"data.batch_size={global_batch} must be divisible by data-parallel ranks ({world}) × "
                f"train.grad_accum ({grad_accum})"
            )
        self.data, self.B, self.rank, self.world, self.accum, self.seed = data, global_batch, rank, world, grad_accum, seed
        self.consumed = 0  # global sequences consumed: the whole iterator state
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._perm_epoch = epoch
        return self._perm

    def _indices(self, start: int, count: int) -> np.ndarray:
        out, n = [], len(self.data)
        while count > 0:
            epoch, pos = divmod(start, n)
            take = min(count, n - pos)
            out.append(self._order(epoch)[pos : pos + take])
            start, count = start + take, count - take
        return np.concatenate(out)

    def next(self) -> list[Batch]:
        """This rank's `grad_accum` micro-batches of the next global batch."""
        per_rank = self.B // self.world
        idx = self._indices(self.consumed + self.rank * per_rank, per_rank)
        self.consumed += self.B
        seqs = self.data.get(idx)
        return [Batch(c[:, :-1], c[:, 1:]) for c in seqs.chunk(self.accum)]

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.data)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "n_sequences": len(self.data), "seq_len": self.data.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.data.seq_len) != self.data.seq_len or state.get("n_sequences", len(self.data)) != len(self.data):
            raise UserError(
                f"checkpoint data position was recorded for {state.get('n_sequences')} sequences of "
                f"{state.get('seq_len')} tokens, but the configured data gives {len(self.data)} of "
                f"{self.data.seq_len}: the corpus or data.seq_len changed (set train.reset_data=true to restart the stream)"
            )
        self.consumed = int(state["consumed"])


def validation_batches(data: PackedSequences, n_sequences: int, batch: int, rank: int, world: int) -> Iterator[torch.Tensor]:
    """The first `n_sequences` validation sequences (fixed, unshuffled), this rank's share."""
    idx = np.arange(min(n_sequences, len(data)))[rank::world]
    for i in range(0, len(idx), batch):
        yield data.get(idx[i : i + batch])
