"""Data: token shards (`launch.shards`, made by `launch.tokenize` or automatically by the trainer)
served as a deterministic, resumable, rank-sharded stream of global batches.

The corpus is the concatenation of its documents (each BOS + pieces + EOS), read through
`np.memmap`: a rank holds no tokens in memory beyond the batch it is building, so its memory does
not grow with the corpus. Training sequences are its non-overlapping windows of seq_len + 1
tokens (inputs and shifted targets).

The stream's position is one integer: the number of global sequences consumed. Epoch e visits the
windows in a seeded permutation of their indices (`IndexPermutation`, keyed by (seed, e)), computed
per index, never materialised. Global batch s is sequences [s·B, (s+1)·B) of that endless order;
rank r of W takes rows [r·B/W, (r+1)·B/W) and splits them into `grad_accum` micro-batches. So the
data a step sees does not depend on the number of ranks, and a checkpoint saved at one world size
resumes exactly at another.

`data.mix` adds sources at fixed ratios (`MixedSequences`): the fraction of training sequences
drawn from each; the position is still the one integer, and the mixture a function of it and the seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from launch.data.permutation import IndexPermutation
from launch.data.shards import (
    TOKENIZER,
    ShardError,
    TokenShards,
    is_shard_dir,
    open_shards,
    tokenizer_fingerprint,
)
from launch.data.sources import ENCODING_ERRORS, Source, open_source
from launch.data.tokenize_corpus import (
    Inputs,
    default_workers,
    ensure_shards,
    remove_stale_temps,
    tokenize_files,
)
from launch.data.tokenizer import Tokenizer
from launch.runtime.errors import ConfigError, UserError

ORDER = "feistel-v1"  # the epoch permutation; recorded with the data position


# ---------------------------------------------------------------------------------------------
# Token sources


def shard_tokenizer(source: str | None) -> Path | None:
    """The tokenizer saved in a shard directory named by a data source, if it is one."""
    if source and is_shard_dir(source) and (Path(source) / TOKENIZER).is_file():
        return Path(source) / TOKENIZER
    return None


def _cache_key(
    source: Source, tokenizer: Tokenizer, fmt: str, text_field: str, encoding_errors: str, doc_separator: str
) -> str:
    """The cache directory's name: what the source is (paths; dataset name, config, split) and how it
    is read. Its contents (sizes and mtimes; a dataset's revision or fingerprint) are in the index, so
    a changed source re-tokenizes into the same directory."""
    key = [source.key(), fmt, text_field, encoding_errors, tokenizer_fingerprint(tokenizer)]
    if doc_separator != "file":  # keeps the keys of caches made before data.doc_separator existed
        key.append(doc_separator)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def tokenize_source(
    source: str,
    split: str,
    tokenizer: Tokenizer,
    cache_dir: Path | None,
    fmt: str = "auto",
    text_field: str = "text",
    encoding_errors: str = "strict",
    workers: int = 1,
    progress: bool = False,
    create: bool = True,
    doc_separator: str = "file",
) -> TokenShards:
    """A source's tokens. A shard directory (from `launch.tokenize`) is opened as it is: one that
    does not match its index or the tokenizer is an error. Anything else is tokenized into
    `cache_dir/SPLIT-KEY/` (KEY: the files, options and tokenizer) unless an intact, current copy
    is there; a damaged or stale copy is re-made. `cache_dir=None` tokenizes into memory (small
    inputs). `create=False` only opens the cache (ranks other than the one that made it)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if is_shard_dir(source):
        try:
            return open_shards(source, fingerprint, tokenizer.vocab_size)
        except ShardError as e:
            raise ShardError(f"data source {e} (re-run python -m launch.tokenize to rebuild it)") from None
    src = open_source(source, split, fmt, text_field, encoding_errors, doc_separator)
    inputs = Inputs(src, tokenizer, fmt, text_field, encoding_errors, doc_separator=doc_separator)
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenize_files(inputs, Path(tmp) / "shards", workers, progress, made_by="launch.data")
            shards = open_shards(Path(tmp) / "shards")
            return TokenShards.in_memory(np.asarray(shards))
    out = (
        Path(cache_dir)
        / f"{split}-{_cache_key(src, tokenizer, fmt, text_field, encoding_errors, doc_separator)}"
    )
    if create:
        remove_stale_temps(Path(cache_dir))  # any source's debris: this run owns the cache
        ensure_shards(inputs, out, workers, progress, made_by="launch.train")
    return open_shards(out, fingerprint, tokenizer.vocab_size)


class PackedSequences:
    """Non-overlapping windows of seq_len+1 tokens (inputs and shifted targets) over a corpus."""

    def __init__(self, tokens: np.ndarray | TokenShards, seq_len: int):
        self.tokens = tokens if isinstance(tokens, TokenShards) else TokenShards.in_memory(tokens)
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len
        if self.n < 1:
            raise UserError(
                f"corpus has {len(self.tokens)} tokens: fewer than one sequence of data.seq_len={seq_len}"
            )

    def __len__(self) -> int:
        return self.n

    def get(self, indices: np.ndarray) -> torch.Tensor:
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        return torch.from_numpy(self.tokens.windows(starts, self.seq_len + 1))


# ---------------------------------------------------------------------------------------------
# Mixing


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
            raise UserError(
                f"data.mix[{i}] must be a mapping with 'path' and 'ratio' (e.g. {{path: facts/train.txt, ratio: 0.2}}), got {entry!r}"
            )
        unknown = set(entry) - {"path", "ratio", "format", "text_field"}
        if unknown:
            raise UserError(
                f"data.mix[{i}]: unknown key(s) {', '.join(sorted(unknown))}; valid: path, ratio, format, text_field"
            )
        ratio = entry["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
            raise UserError(f"data.mix[{i}].ratio={ratio!r} must be a fraction strictly between 0 and 1")
        sources.append(
            MixSource(str(entry["path"]), float(ratio), entry.get("format"), entry.get("text_field"))
        )
    total = sum(s.ratio for s in sources)
    if total >= 1:
        raise UserError(
            f"data.mix ratios sum to {total:g}: they must leave the main source (data.train) a share above 0"
        )
    return sources


def training_documents(data) -> Iterator[str]:
    """The text of a `DataConfig`'s whole training mixture, streamed: data.train, then each data.mix
    source (its own format/text_field where given), as segments (a long document in pieces cut at
    line breaks). The trainer trains its tokenizer on these, so the pieces are learnt from what the
    model actually reads; sentencepiece samples their lines (`data.tokenizer_sample`)."""
    entries = [(data.train, data.format, data.text_field)]
    entries += [
        (m.path, m.format or data.format, m.text_field or data.text_field) for m in parse_mix(data.mix)
    ]
    for path, fmt, text_field in entries:
        src = open_source(path, "train", fmt, text_field, data.encoding_errors, data.doc_separator)
        for text, _, _ in src.segments():
            yield text


class MixedSequences:
    """Several packed sources behind one index space, in fixed proportions.

    A period of P slots (P = the smallest index space holding every source once at its ratio,
    max_k n_k / r_k, capped at 65536) gives source k round(r_k·P) slots spread evenly over it; the
    index space is that period repeated until every source is covered once. Source k's j-th slot
    overall reads its sequence j mod n_k (small sources repeat, large ones are covered once per
    pass). Nothing of the index space's size is stored: `locate` is arithmetic on the period. The
    mapping depends on nothing but the sources and ratios, so `BatchStream`'s seeded permutation
    and its one-integer position make the mixture a deterministic, resumable function of
    (seed, position), at any world size.
    """

    PERIOD = 1 << 16

    def __init__(self, sources: list[PackedSequences], ratios: list[float]):
        if len(sources) != len(ratios) or not sources:
            raise ValueError("need one ratio per source")
        if abs(sum(ratios) - 1) > 1e-6:
            raise ValueError(f"ratios must sum to 1, got {sum(ratios)}")
        seq_lens = {s.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"sources have different seq_len: {sorted(seq_lens)}")
        self.sources, self.ratios, self.seq_len = sources, ratios, seq_lens.pop()
        p = min(max(math.ceil(len(s) / r) for s, r in zip(sources, ratios)), self.PERIOD)
        self.counts = np.array([max(1, round(r * p)) for r in ratios], dtype=np.int64)
        # Slot j of source k sits at (j + 0.5) / count_k along the period: an even interleave.
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts])
        owner = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(self.counts)])
        rank = np.concatenate([np.arange(c, dtype=np.int64) for c in self.counts])
        order = np.lexsort((owner, keys))
        self._owner, self._rank = owner[order], rank[order]
        self.period = int(self.counts.sum())
        self.lengths = np.array([len(s) for s in sources], dtype=np.int64)
        self.n = self.period * int(max(math.ceil(n / c) for n, c in zip(self.lengths, self.counts)))

    def __len__(self) -> int:
        return self.n

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, sequence within that source) of each index."""
        cycle, slot = np.divmod(np.asarray(indices, dtype=np.int64), self.period)
        owner = self._owner[slot]
        return owner, (cycle * self.counts[owner] + self._rank[slot]) % self.lengths[owner]

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return self.locate(indices)[0]

    def get(self, indices: np.ndarray) -> torch.Tensor:
        owner, local = self.locate(indices)
        out = torch.empty(len(owner), self.seq_len + 1, dtype=torch.int64)
        for k, src in enumerate(self.sources):
            rows = np.nonzero(owner == k)[0]
            if len(rows):
                out[torch.from_numpy(rows)] = src.get(local[rows])
        return out


def mix_sequences(cfg, main: PackedSequences, extras: list[TokenShards]) -> PackedSequences | MixedSequences:
    """data.train's sequences, mixed with the `data.mix` sources' when there are any."""
    mix = parse_mix(cfg.mix)
    if not mix:
        return main
    packed = [PackedSequences(t, cfg.seq_len) for t in extras]
    return MixedSequences([main, *packed], [1 - sum(m.ratio for m in mix), *(m.ratio for m in mix)])


def train_sequences(
    cfg, train_tokens: np.ndarray | TokenShards, tokenizer: Tokenizer, cache_dir: Path | None
) -> PackedSequences | MixedSequences:
    """The training data of a `DataConfig`: data.train packed, mixed with the `data.mix` sources
    (`ratio` = fraction of training sequences drawn from that source; data.train gets the rest)."""
    extras = [
        tokenize_source(
            m.path,
            "train",
            tokenizer,
            cache_dir,
            m.format or cfg.format,
            m.text_field or cfg.text_field,
            cfg.encoding_errors,
        )
        for m in parse_mix(cfg.mix)
    ]
    return mix_sequences(cfg, PackedSequences(train_tokens, cfg.seq_len), extras)


# ---------------------------------------------------------------------------------------------
# What the trainer calls


class Datasets(NamedTuple):
    train: PackedSequences | MixedSequences
    val: PackedSequences | None
    unigram_ppl: float | None  # val perplexity under train's add-one unigram counts


def unigram_perplexity(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Perplexity of the validation tokens under add-one-smoothed unigram counts of the training
    tokens (both given as per-id counts): the bar a language model must clear to have learned
    anything beyond token frequencies."""
    counts = train_counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-(val_counts * logp).sum() / max(val_counts.sum(), 1)))


def build_datasets(cfg, tok: Tokenizer, info) -> Datasets:
    """Training, validation and unigram baseline of a run's `cfg.data`. Sources that are not
    shard directories are tokenized by rank 0 into `data.cache_dir` (default RUN_DIR/data_cache)
    with `data.tokenize_workers` processes, once; every rank then maps the shards."""
    from launch.distributed.process_group import barrier

    d = cfg.data
    if d.tokenize_workers < 0:
        raise UserError(f"data.tokenize_workers={d.tokenize_workers} must be 0 (one per CPU core) or more")
    if d.encoding_errors not in ENCODING_ERRORS:
        raise UserError(f"data.encoding_errors={d.encoding_errors!r}: expected strict or replace")
    cache = Path(d.cache_dir) if d.cache_dir else Path(cfg.run.dir) / "data_cache"
    sources = [(d.train, "train", d.format, d.text_field)]
    sources += [
        (m.path, "train", m.format or d.format, m.text_field or d.text_field) for m in parse_mix(d.mix)
    ]
    if d.val:
        sources.append((d.val, "val", d.format, d.text_field))
    workers = d.tokenize_workers or default_workers()

    def load(create: bool) -> list[TokenShards]:
        return [
            tokenize_source(
                src,
                split,
                tok,
                cache,
                fmt,
                field,
                d.encoding_errors,
                workers,
                cfg.train.progress and create,
                create,
                d.doc_separator,
            )
            for src, split, fmt, field in sources
        ]

    if info.is_main:  # rank 0 tokenizes what is missing; the others only map the result
        load(create=True)
    barrier()
    tokens = load(create=info.is_main)
    train, extras = tokens[0], tokens[1 : 1 + len(parse_mix(d.mix))]
    val = tokens[-1] if d.val else None
    unigram = None
    if val is not None:
        unigram = unigram_perplexity(train.token_counts(tok.vocab_size), val.token_counts(tok.vocab_size))
    return Datasets(
        mix_sequences(d, PackedSequences(train, d.seq_len), extras),
        PackedSequences(val, d.seq_len) if val is not None else None,
        unigram,
    )


# ---------------------------------------------------------------------------------------------
# The stream


@dataclass
class Batch:
    inputs: torch.Tensor  # (b, T)
    targets: torch.Tensor  # (b, T)


class BatchStream:
    """Endless seeded stream of global batches; this rank's micro-batches of each."""

    def __init__(
        self,
        data: PackedSequences | MixedSequences,
        global_batch: int,
        rank: int,
        world: int,
        grad_accum: int,
        seed: int,
    ):
        if global_batch % (world * grad_accum):
            raise ConfigError(
                f"data.batch_size={global_batch} must be divisible by data-parallel ranks ({world}) × "
                f"train.grad_accum ({grad_accum})"
            )
        self.data, self.B, self.rank, self.world, self.accum, self.seed = (
            data,
            global_batch,
            rank,
            world,
            grad_accum,
            seed,
        )
        self.consumed = 0  # global sequences consumed: the whole iterator state
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> IndexPermutation:
        if epoch != self._perm_epoch:
            self._perm = IndexPermutation(len(self.data), [self.seed, epoch])
            self._perm_epoch = epoch
        return self._perm

    def _indices(self, start: int, count: int) -> np.ndarray:
        out, n = [], len(self.data)
        while count > 0:
            epoch, pos = divmod(start, n)
            take = min(count, n - pos)
            out.append(self._order(epoch)(np.arange(pos, pos + take)))
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
        return {
            "consumed": self.consumed,
            "seed": self.seed,
            "n_sequences": len(self.data),
            "seq_len": self.data.seq_len,
            "order": ORDER,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.data.seq_len) != self.data.seq_len or state.get(
            "n_sequences", len(self.data)
        ) != len(self.data):
            raise UserError(
                f"checkpoint data position was recorded for {state.get('n_sequences')} sequences of "
                f"{state.get('seq_len')} tokens, but the configured data gives {len(self.data)} of "
                f"{self.data.seq_len}: the corpus or data.seq_len changed (set train.reset_data=true to restart the stream)"
            )
        if state.get("order") != ORDER:
            print(
                f"warning: the checkpoint's data position ({state['consumed']} sequences) was recorded with an older "
                f"epoch order; continuing from it in the {ORDER} order (set train.reset_data=true to restart the stream)",
                file=sys.stderr,
                flush=True,
            )
        self.consumed = int(state["consumed"])


def validation_batches(
    data: PackedSequences, n_sequences: int, batch: int, rank: int, world: int
) -> Iterator[torch.Tensor]:
    """The first `n_sequences` validation sequences (fixed, unshuffled), this rank's share."""
    idx = np.arange(min(n_sequences, len(data)))[rank::world]
    for i in range(0, len(idx), batch):
        yield data.get(idx[i : i + batch])
