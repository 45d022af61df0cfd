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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from launch.data.corpus import shakespeare_files
from launch.data.hub import DatasetSource
from launch.data.rows import (
    HUB_PREFIX,
    Segment,
    as_segments,
    check_text,
    dataset_rows,
    is_saved_dataset,
    no_column,
    split_suffix,
    whole_documents,
)
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
# What separates documents in a text file (data.doc_separator): the named modes, else a literal string.
DOC_SEPARATORS = ("file", "blank_line", "line")
CHUNK_BYTES = 1 << 20  # a text file is read and encoded in pieces of about this size


def _format_of(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


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


def _jsonl_documents(path: Path, text_field: str, errors: str) -> Iterator[str]:
    for lineno, row in json_rows(path, errors):
        if text_field not in row:
            raise no_column(f"{path}:{lineno}", text_field, row)
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
        raise no_column(str(path), text_field, columns)
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


def _builder_documents(files: list[Path], kind: str, text_field: str) -> Iterator[str]:
    import datasets

    for path in files:
        try:
            ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True)
            yield from dataset_rows(ds, str(path), text_field)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"cannot read {path} as {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None


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
                    yield from as_segments(_jsonl_documents(path, self.text_field, self.encoding_errors))
                elif self.kind == "parquet":
                    yield from as_segments(_parquet_documents(path, self.text_field))
                else:
                    yield from as_segments(_builder_documents([path], self.kind, self.text_field))
            except (
                EOFError,
                gzip.BadGzipFile,
                OSError,
            ) as e:  # truncated or corrupt compressed stream, I/O error
                raise UserError(
                    f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                ) from None

    def documents(self) -> Iterator[str]:
        return whole_documents(self.segments())


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
    if source.startswith(HUB_PREFIX) or is_saved_dataset(split_suffix(source)[0]):
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
