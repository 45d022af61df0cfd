"""Training text sources: which files a `data.train`-style string names, and their documents as a
stream (one file open at a time, never the whole corpus in memory).

Formats, by suffix (after an optional `.gz` / `.zst` compression suffix):
  .txt .text .md   one document per file (its whole text)
  .jsonl .json     one document per line: the string in `text_field` (JSON Lines)
  .parquet         one document per row of column `text_field`

Text must be UTF-8. Anything else (Latin-1, binary, UTF-16) is refused with the file and the byte
offset of the first bad byte, unless `encoding_errors="replace"` asks for U+FFFD replacements.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
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
}
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
ENCODING_ERRORS = ("strict", "replace")


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
            source.count("/") == 1
            and not source.startswith((".", "/", "~"))
            and not path.suffix
            and not path.parent.exists()
        )
        if looks_like_hub_name:
            raise UserError(
                f"data source {source!r} is not a local path. This machine is offline: download the "
                f"dataset and point data.train/data.val at the local files (.txt, .jsonl, .parquet)"
            )
        raise UserError(
            f"data source {source!r} matches no files (expected .txt, .jsonl or .parquet, optionally .gz/.zst)"
        )
    return files


def source_format(files: list[Path], fmt: str = "auto") -> str:
    """The one format of `files` ('text' | 'jsonl' | 'parquet'): `fmt`, or inferred from suffixes."""
    if fmt != "auto":
        if fmt not in ("text", "jsonl", "parquet"):
            raise UserError(f"data.format={fmt!r}: expected auto, text, jsonl or parquet")
        return fmt
    kinds = {_format_of(p) for p in files}
    if None in kinds or len(kinds) != 1:
        raise UserError(
            f"cannot infer data.format from {sorted({''.join(p.suffixes[-2:]) for p in files})}: use one kind of "
            f".txt, .jsonl, .parquet (optionally .gz/.zst) per source, or set data.format"
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


def _text_documents(path: Path, errors: str) -> Iterator[str]:
    with _open_binary(path) as f:
        data = f.read()
    text = _decode(data, path, 0, errors)
    if text:
        yield text


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
            raise UserError(
                f"{path}:{lineno}: no column {text_field!r} (data.text_field); columns are {', '.join(row) or 'none'}"
            )
        text = row[text_field]
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: {text_field!r} must be a string, got {type(text).__name__}")
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
        raise UserError(
            f"{path}: no column {text_field!r} (data.text_field); columns are {', '.join(columns)}"
        )
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    except Exception as e:
        raise UserError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None


def iter_documents(
    files: list[Path], fmt: str = "auto", text_field: str = "text", encoding_errors: str = "strict"
) -> Iterator[str]:
    """The non-empty documents of `files`, in file order, streamed."""
    if encoding_errors not in ENCODING_ERRORS:
        raise UserError(f"data.encoding_errors={encoding_errors!r}: expected strict or replace")
    kind = source_format(files, fmt)
    for path in files:
        try:
            if kind == "text":
                yield from _text_documents(path, encoding_errors)
            elif kind == "jsonl":
                yield from _jsonl_documents(path, text_field, encoding_errors)
            else:
                yield from _parquet_documents(path, text_field)
        except (
            EOFError,
            gzip.BadGzipFile,
            OSError,
        ) as e:  # truncated or corrupt compressed stream, I/O error
            raise UserError(
                f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None


def load_documents(
    source: str, split: str, fmt: str = "auto", text_field: str = "text", encoding_errors: str = "strict"
) -> list[str]:
    """Every document of a source as a list (for small inputs, e.g. training a tokenizer)."""
    return list(iter_documents(resolve_files(source, split), fmt, text_field, encoding_errors))
