"""What every text source shares: a document as segments, a row's text checked to be a string, the
`DIR:SPLIT` and `hf://` spellings, and how a saved `datasets` directory is recognised."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from launch.runtime.errors import UserError

HUB_PREFIX = "hf://"


# Splits the usage split ('train' / 'val') into a dataset's split name when the source names none.
VAL_SPLITS = ("validation", "valid", "val", "test")


Segment = tuple[str, bool, bool]  # (text, starts a document, ends a document)


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A directory written by `Dataset.save_to_disk` (state.json + dataset_info.json) or
    `DatasetDict.save_to_disk` (dataset_dict.json): recognised by those metadata files, so it is read
    through `datasets` rather than as a directory of text files (its dataset_info.json is not JSONL)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def split_suffix(source: str) -> tuple[str, str | None]:
    """'DIR:SPLIT' -> (DIR, SPLIT) when DIR is a saved dataset; else (source, None)."""
    base, colon, split = source.rpartition(":")
    if colon and split and "/" not in split and is_saved_dataset(base):
        return base, split
    return source, None


def check_text(value, where: str, text_field: str) -> str:
    """A row's text, which must be a string: null, numbers and lists fail naming where and what."""
    if isinstance(value, str):
        return value
    got = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
    raise UserError(
        f"{where}: column {text_field!r} (data.text_field) must hold a string, got {got}; "
        f"fix the row or point data.text_field at the text column"
    )


def no_column(where: str, text_field: str, columns) -> UserError:
    return UserError(
        f"{where}: no column {text_field!r} (data.text_field); columns are {', '.join(columns) or 'none'}"
    )


def dataset_rows(ds, where: str, text_field: str) -> Iterator[str]:
    """The texts of a `datasets` Dataset / IterableDataset, in batches (a Dataset is memory-mapped
    arrow, an IterableDataset a stream: neither is held whole)."""
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise no_column(where, text_field, columns)
    row = 0
    for batch in ds.iter(batch_size=1000):
        if text_field not in batch:
            raise no_column(where, text_field, list(batch))
        for text in batch[text_field]:
            row += 1
            if check_text(text, f"{where}: row {row}", text_field):
                yield text


def whole_documents(segments: Iterator[Segment]) -> Iterator[str]:
    """Segments joined back into documents (for small inputs only: a document is held whole)."""
    parts: list[str] = []
    for text, _, last in segments:
        parts.append(text)
        if last:
            yield "".join(parts)
            parts = []


def as_segments(docs: Iterator[str]) -> Iterator[Segment]:
    return ((d, True, True) for d in docs)
