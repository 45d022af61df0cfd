"""Training text sources: what a `data.train`-style string names, and its documents as a stream
(one file open at a time, never the whole corpus in memory).

A source string is one of
  shakespeare                 the bundled plays
  PATH | DIR | GLOB           local files (formats below)
  DIR[:SPLIT]                 a directory written by `datasets`' `save_to_disk` (a `Dataset`, or a
                              `DatasetDict` and one of its splits), read with `datasets.load_from_disk`
  hf://NAME[/CONFIG][:SPLIT][@REVISION]
                              a Hugging Face hub dataset, streamed with `datasets.load_dataset(...,
                              streaming=True)`; offline, from the local hub cache (`huggingface-cli download`)

File formats, by suffix (after an optional `.gz` / `.zst` compression suffix):
  .txt .text .md   text, split into documents by `doc_separator` (default: one per file), streamed
                   in chunks of about a megabyte whatever the file size
  .jsonl .json     one document per line: the string in `text_field` (JSON Lines)
  .parquet         one document per row of column `text_field`
  .csv .arrow      one document per row of column `text_field`, through `datasets`' builders
We read .txt, .jsonl and .parquet ourselves: they stream with no arrow cache conversion, keep exact
byte offsets for encoding errors and chunk large text (not yet timed against `datasets`' json/text
builders); csv and arrow go through
`datasets`, which handles their dialects and the arrow stream format.

Documents flow as segments `(text, first, last)`: a document is one segment, or (a whole-file text
document, or one longer than a chunk) several consecutive ones; the tokenizer encodes a segment that
continues a document as it would be encoded in place (`Tokenizer.encode_segment`).

Text must be UTF-8. Anything else (Latin-1, binary, UTF-16) is refused with the file and the byte
offset of the first bad byte, unless `encoding_errors="replace"` asks for U+FFFD replacements.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launch.data.corpus import shakespeare_files
from launch.runtime.errors import UserError

FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
ENCODING_ERRORS = ("strict", "replace")
HUB_PREFIX = "hf://"
# What separates documents in a text file (data.doc_separator): the named modes, else a literal string.
DOC_SEPARATORS = ("file", "blank_line", "line")
CHUNK_BYTES = 1 << 20  # a text file is read and encoded in pieces of about this size
# Splits the usage split ('train' / 'val') into a dataset's split name when the source names none.
VAL_SPLITS = ("validation", "valid", "val", "test")

Segment = tuple[str, bool, bool]  # (text, starts a document, ends a document)


def _format_of(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A directory written by `Dataset.save_to_disk` (state.json + dataset_info.json) or
    `DatasetDict.save_to_disk` (dataset_dict.json): recognised by those metadata files, so it is read
    through `datasets` rather than as a directory of text files (its dataset_info.json is not JSONL)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _split_suffix(source: str) -> tuple[str, str | None]:
    """'DIR:SPLIT' -> (DIR, SPLIT) when DIR is a saved dataset; else (source, None)."""
    base, colon, split = source.rpartition(":")
    if colon and split and "/" not in split and is_saved_dataset(base):
        return base, split
    return source, None


def resolve_files(source: str, split: str) -> list[Path]:
    """'shakespeare' (bundled corpus) or a local file, directory or glob."""
    if source == "shakespeare":
        return shakespeare_files(split)
    path = Path(source)
    if path.is_file():
        return [path]
    if (path / "index.json").is_file() and (path / "tokenizer.model").is_file():
        raise UserError(
            f"{source} holds token shards (from launch.tokenize), not text: it can be trained on, but a tokenizer "
            f"cannot be made from it (use data.tokenizer={path / 'tokenizer.model'})"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p))
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        looks_like_hub_name = (
            source.count("/") in (1, 2)
            and not source.startswith((".", "/", "~"))
            and not path.suffix
            and not path.parent.exists()
        )
        if looks_like_hub_name:
            raise UserError(
                f"data source {source!r} is not a local path; for a Hugging Face hub dataset write "
                f"hf://{source} (hf://NAME[/CONFIG][:SPLIT][@REVISION])"
            )
        raise UserError(
            f"data source {source!r} matches no files (expected .txt, .jsonl, .parquet, .csv or .arrow, "
            f"optionally .gz/.zst, a saved datasets directory, or hf://NAME)"
        )
    return files


def source_format(files: list[Path], fmt: str = "auto") -> str:
    """The one format of `files` ('text' | 'jsonl' | 'parquet' | 'csv' | 'arrow'): `fmt`, or inferred."""
    kinds_known = sorted(set(FORMATS.values()))
    if fmt != "auto":
        if fmt not in kinds_known:
            raise UserError(f"data.format={fmt!r}: expected auto, {', '.join(kinds_known)}")
        return fmt
    kinds = {_format_of(p) for p in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(
            f"cannot infer data.format from {sorted({''.join(p.suffixes[-2:]) for p in files})}: use one kind of "
            f".txt, .jsonl, .parquet, .csv, .arrow (optionally .gz/.zst) per source, or set data.format"
        )
    return kinds.pop()


def _open_binary(path: Path) -> io.BufferedIOBase:
    compression = COMPRESSION.get(path.suffix)
    try:
        if compression == "gzip":
            return gzip.open(path, "rb")
        if compression == "zstd":
            import pyarrow as pa  # zstd comes with pyarrow (a dependency of `datasets`): no extra package

            return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _decode(data: bytes, path: Path, offset: int, errors: str) -> str:
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        where = " (decompressed)" if path.suffix in COMPRESSION else ""
        raise UserError(
            f"{path}: not UTF-8 text at byte {offset + e.start}{where} (0x{data[e.start]:02x}); convert it to UTF-8 "
            f"or set data.encoding_errors=replace to decode it with U+FFFD replacements"
        ) from None
    if errors == "strict" and "\x00" in text:
        nul = offset + len(text[: text.index("\x00")].encode("utf-8"))
        raise UserError(
            f"{path}: NUL byte at byte {nul}: this looks like a binary (or UTF-16) file, not UTF-8 text; "
            f"set data.encoding_errors=replace to read it anyway"
        )
    return text


def _safe_cut(data: bytes) -> int:
    """Where to end a chunk of `data` so no chunk boundary falls inside a line or a UTF-8 character:
    after the last newline; without one, before the last space; else at a character boundary."""
    for sep, after in ((b"\n", 1), (b" ", 0)):
        i = data.rfind(sep)
        if i > 0:
            return i + after
    i = len(data)
    while i > 0 and len(data) - i < 4 and (data[i - 1] & 0xC0) == 0x80:  # back over continuation bytes
        i -= 1
    return i - 1 if i > 0 and data[i - 1] >= 0xC0 else len(data)


def text_chunks(path: Path, errors: str = "strict", chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """A text file's text in chunks of about `chunk_bytes`, each ending at a line break where the
    file has one within a chunk (else before a space, else at a character boundary); bad UTF-8 fails
    naming the byte offset in the file."""
    offset, pending = 0, b""
    with _open_binary(path) as f:
        while True:
            block = f.read(chunk_bytes)
            data = pending + block
            if not block:
                if data:
                    yield _decode(data, path, offset, errors)
                return
            cut = _safe_cut(data) if len(data) >= chunk_bytes else 0
            if cut <= 0:
                pending = data
                continue
            yield _decode(data[:cut], path, offset, errors)
            offset += cut
            pending = data[cut:]


def _separator_pattern(separator: str) -> re.Pattern | None:
    if separator == "file":
        return None
    if separator == "blank_line":
        return re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
    if separator == "line":
        return re.compile(r"\r?\n")
    if not separator:
        raise UserError("data.doc_separator is empty: expected file, blank_line, line or a separator string")
    return re.compile(re.escape(separator.encode().decode("unicode_escape")))


def _text_segments(
    path: Path, errors: str, separator: str, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[Segment]:
    """Documents of a text file as segments, in bounded memory: complete documents between
    separators are whole segments; a document longer than a chunk goes out in chunk-sized segments
    cut at line breaks, so nothing larger than about two chunks is ever held."""
    pattern = _separator_pattern(separator)
    tail = len(separator) if separator not in DOC_SEPARATORS else 0  # a literal separator may straddle chunks
    carry, started = "", False  # started: a document's first segment went out, its last did not
    for chunk in text_chunks(path, errors, chunk_bytes):
        if pattern is None:  # the whole file is one document: every chunk but the last is a segment
            if carry:
                yield carry, not started, False
                started = True
            carry = chunk
            continue
        carry += chunk
        *done, carry = pattern.split(carry)
        for doc in done:
            if started:
                yield doc, False, True
                started = False
            elif doc.strip():
                yield doc, True, True
        if len(carry) > chunk_bytes:
            # A document longer than a chunk: send all but the tail. Cut before the last line break in
            # reach, so that break (and any separator starting there) stays in the tail.
            cut = carry.rfind("\n", 0, len(carry) - tail)
            if cut > 0 and (started or carry[:cut].strip()):
                yield carry[:cut], not started, False
                started, carry = True, carry[cut:]
    if started:
        yield carry, False, True
    elif carry.strip() if pattern is not None else carry:
        yield carry, True, True


def json_rows(path: Path, errors: str = "strict") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file (optionally compressed),
    streamed; non-UTF-8 bytes and bad JSON fail naming `path` and the byte offset or line."""
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, errors)
            offset += len(raw)
            if line.strip():
                yield lineno, json_object(line, path, lineno)


def json_object(line: str, path: Path, lineno: int) -> dict:
    """One JSON Lines row, which must be an object; anything else fails naming `path:lineno`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
    return row


def check_text(value, where: str, text_field: str) -> str:
    """A row's text, which must be a string: null, numbers and lists fail naming where and what."""
    if isinstance(value, str):
        return value
    got = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
    raise UserError(
        f"{where}: column {text_field!r} (data.text_field) must hold a string, got {got}; "
        f"fix the row or point data.text_field at the text column"
    )


def _no_column(where: str, text_field: str, columns) -> UserError:
    return UserError(
        f"{where}: no column {text_field!r} (data.text_field); columns are {', '.join(columns) or 'none'}"
    )


def _jsonl_documents(path: Path, text_field: str, errors: str) -> Iterator[str]:
    for lineno, row in json_rows(path, errors):
        if text_field not in row:
            raise _no_column(f"{path}:{lineno}", text_field, row)
        text = check_text(row[text_field], f"{path}:{lineno}", text_field)
        if text:
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise _no_column(str(path), text_field, columns)
    row = 0
    try:
        batches = pf.iter_batches(columns=[text_field], batch_size=1024)
        for batch in batches:
            for text in batch.column(0).to_pylist():
                row += 1
                if check_text(text, f"{path}: row {row}", text_field):
                    yield text
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None


def _dataset_rows(ds, where: str, text_field: str) -> Iterator[str]:
    """The texts of a `datasets` Dataset / IterableDataset, in batches (a Dataset is memory-mapped
    arrow, an IterableDataset a stream: neither is held whole)."""
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise _no_column(where, text_field, columns)
    row = 0
    for batch in ds.iter(batch_size=1000):
        if text_field not in batch:
            raise _no_column(where, text_field, list(batch))
        for text in batch[text_field]:
            row += 1
            if check_text(text, f"{where}: row {row}", text_field):
                yield text


def _builder_documents(files: list[Path], kind: str, text_field: str) -> Iterator[str]:
    import datasets

    for path in files:
        try:
            ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True)
            yield from _dataset_rows(ds, str(path), text_field)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"cannot read {path} as {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None


def _whole(segments: Iterator[Segment]) -> Iterator[str]:
    """Segments joined back into documents (for small inputs only: a document is held whole)."""
    parts: list[str] = []
    for text, _, last in segments:
        parts.append(text)
        if last:
            yield "".join(parts)
            parts = []


def _as_segments(docs: Iterator[str]) -> Iterator[Segment]:
    return ((d, True, True) for d in docs)


# ---------------------------------------------------------------------------------------------
# Sources: what a source string names, its documents, and what identifies its contents


@dataclass
class FileSource:
    """Local files of one format."""

    files: list[Path]
    fmt: str = "auto"
    text_field: str = "text"
    encoding_errors: str = "strict"
    doc_separator: str = "file"

    def __post_init__(self):
        if self.encoding_errors not in ENCODING_ERRORS:
            raise UserError(f"data.encoding_errors={self.encoding_errors!r}: expected strict or replace")
        self.kind = source_format(self.files, self.fmt)
        _separator_pattern(self.doc_separator)  # an empty separator fails now, not mid-stream

    def describe(self) -> str:
        return ", ".join(map(str, self.files[:3])) + (" ..." if len(self.files) > 3 else "")

    def key(self) -> list:
        """What names the source (not its contents): the cache directory is keyed by it."""
        return [str(p.resolve()) for p in self.files]

    def record(self) -> list[dict]:
        """What a change to the contents is detected by: resolved path, size and mtime of every file."""
        from launch.data.shards import source_records

        return source_records(self.files)

    def segments(self) -> Iterator[Segment]:
        for path in self.files:
            try:
                if self.kind == "text":
                    yield from _text_segments(path, self.encoding_errors, self.doc_separator)
                elif self.kind == "jsonl":
                    yield from _as_segments(_jsonl_documents(path, self.text_field, self.encoding_errors))
                elif self.kind == "parquet":
                    yield from _as_segments(_parquet_documents(path, self.text_field))
                else:
                    yield from _as_segments(_builder_documents([path], self.kind, self.text_field))
            except (
                EOFError,
                gzip.BadGzipFile,
                OSError,
            ) as e:  # truncated or corrupt compressed stream, I/O error
                raise UserError(
                    f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                ) from None

    def documents(self) -> Iterator[str]:
        return _whole(self.segments())


def parse_hub_name(source: str) -> tuple[str, str | None, str | None, str | None]:
    """'hf://NAME[/CONFIG][:SPLIT][@REVISION]' -> (NAME, CONFIG, SPLIT, REVISION). NAME is OWNER/NAME
    (or a bare NAME for the few datasets without an owner); a third path part is the config."""
    body = source[len(HUB_PREFIX) :]
    body, at, revision = body.partition("@")
    body, colon, split = body.partition(":")
    parts = body.strip("/").split("/")
    if not parts[0] or len(parts) > 3 or (at and not revision) or (colon and not split):
        raise UserError(
            f"data source {source!r}: expected hf://NAME[/CONFIG][:SPLIT][@REVISION], e.g. "
            f"hf://HuggingFaceFW/fineweb-edu/sample-10BT:train"
        )
    name = "/".join(parts[:2])
    config = parts[2] if len(parts) == 3 else None
    return name, config, split or None, revision or None


def _offline_error(name: str, revision: str | None, why: str) -> UserError:
    rev = f" --revision {revision}" if revision else ""
    return UserError(
        f"hf://{name}: cannot reach the Hugging Face hub ({why}) and no copy is in the local cache; on a "
        f"machine with network run `huggingface-cli download --repo-type dataset {name}{rev}` (same HF_HOME; "
        f"then it works offline), or `datasets.load_dataset(...).save_to_disk(DIR)` and use DIR"
    )


def _pick_split(available, wanted: str | None, usage: str, where: str) -> str:
    available = list(available)
    if wanted is None:
        candidates = ("train",) if usage == "train" else VAL_SPLITS
        wanted = next((s for s in candidates if s in available), None)
        if wanted is None:
            raise UserError(
                f"{where}: no {usage} split among {', '.join(available)}; name one as {where}:SPLIT"
            )
    if wanted not in available:
        raise UserError(f"{where}: no split {wanted!r}; splits are {', '.join(available)}")
    return wanted


@dataclass
class DatasetSource:
    """A `datasets` dataset: saved with `save_to_disk` (path) or on the hub (hf://)."""

    source: str
    usage: str = "train"  # train | val: which split to pick when the source names none
    text_field: str = "text"
    name: str = ""
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    _resolved: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.source.startswith(HUB_PREFIX):
            self.name, self.config, self.split, self.revision = parse_hub_name(self.source)
        else:
            self.name, self.split = _split_suffix(self.source)

    @property
    def hub(self) -> bool:
        return self.source.startswith(HUB_PREFIX)

    def describe(self) -> str:
        return self.source

    def _open_saved(self):
        import datasets

        try:
            ds = datasets.load_from_disk(self.name)
        except IndexError:  # datasets cannot load a saved Dataset of zero rows (no arrow files)
            raise UserError(f"{self.name}: no text (the saved dataset has no rows)") from None
        except Exception as e:
            raise UserError(f"cannot read saved dataset {self.name}: {str(e).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            self.split = _pick_split(ds.keys(), self.split, self.usage, self.name)
            ds = ds[self.split]
        elif self.split is not None:
            raise UserError(f"{self.name} is a single saved Dataset: drop the :{self.split} split")
        self._resolved["fingerprint"] = ds._fingerprint
        return ds

    def _open_hub(self):
        import datasets

        kwargs = {"streaming": True, "revision": self.revision}
        try:
            ds = datasets.load_dataset(self.name, self.config, **kwargs)
            self._resolved["revision"] = self.revision or _hub_commit(self.name, self.revision)
        except (ConnectionError, OSError) as e:
            # Offline (HF_HUB_OFFLINE=1) or unreachable: a snapshot in the hub cache (huggingface-cli
            # download) is a local dataset repository; `datasets` reads it as one.
            local, commit = _cached_snapshot(self.name, self.revision)
            if local is None:
                why = "HF_HUB_OFFLINE=1" if _hub_offline() else str(e).splitlines()[0][:120]
                raise _offline_error(self.name, self.revision, why) from None
            try:
                ds = datasets.load_dataset(local, self.config, streaming=True)
            except Exception as e2:
                raise UserError(
                    f"{self.source}: cached copy {local} unreadable: {str(e2).splitlines()[0]}"
                ) from None
            self._resolved["revision"] = commit
        except ValueError as e:  # unknown config / split names
            raise UserError(f"{self.source}: {str(e).splitlines()[0]}") from None
        except datasets.exceptions.DatasetNotFoundError as e:
            raise UserError(f"{self.source}: {str(e).splitlines()[0]}") from None
        self.split = _pick_split(ds.keys(), self.split, self.usage, self.source)
        return ds[self.split]

    def open(self):
        return self._open_hub() if self.hub else self._open_saved()

    def key(self) -> list:
        return [
            self.source if self.hub else str(Path(self.name).resolve()),
            self.config,
            self.split,
            self.usage,
            self.text_field,
        ]

    def record(self) -> list[dict]:
        """Dataset name, config, split and revision (hub) or fingerprint (saved): a changed source re-tokenizes."""
        if not self._resolved:
            self.open()
        rec = {
            "dataset": self.name if self.hub else str(Path(self.name).resolve()),
            "config": self.config,
            "split": self.split,
        }
        return [{**rec, **self._resolved}]

    def segments(self) -> Iterator[Segment]:
        ds = self.open()
        if ds.column_names is not None and self.text_field not in ds.column_names:
            raise _no_column(self.source, self.text_field, ds.column_names)
        yield from _as_segments(_dataset_rows(ds, self.source, self.text_field))

    def documents(self) -> Iterator[str]:
        return _whole(self.segments())


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(name: str, revision: str | None) -> tuple[str | None, str | None]:
    """The local hub-cache snapshot of a dataset repository (and its commit), if one was downloaded."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:
        return None, None
    return path, Path(path).name


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit a hub revision points at now (so the index pins what was read)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha
    except Exception:
        return revision


Source = FileSource | DatasetSource


def open_source(
    source: str,
    usage: str = "train",
    fmt: str = "auto",
    text_field: str = "text",
    encoding_errors: str = "strict",
    doc_separator: str = "file",
) -> Source:
    """The source a `data.train`-style string names (`usage`: train | val, for the bundled corpus'
    split and a dataset's default split)."""
    if source.startswith(HUB_PREFIX) or is_saved_dataset(_split_suffix(source)[0]):
        return DatasetSource(source, usage, text_field)
    return FileSource(resolve_files(source, usage), fmt, text_field, encoding_errors, doc_separator)


def iter_documents(
    files: list[Path],
    fmt: str = "auto",
    text_field: str = "text",
    encoding_errors: str = "strict",
    doc_separator: str = "file",
) -> Iterator[str]:
    """The non-empty documents of `files`, in file order, streamed."""
    return FileSource(files, fmt, text_field, encoding_errors, doc_separator).documents()


def load_documents(
    source: str,
    split: str,
    fmt: str = "auto",
    text_field: str = "text",
    encoding_errors: str = "strict",
    doc_separator: str = "file",
) -> list[str]:
    """Every document of a source as a list (for small inputs)."""
    return list(open_source(source, split, fmt, text_field, encoding_errors, doc_separator).documents())
