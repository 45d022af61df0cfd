"""Task specs and loading their examples. The formats (what a row becomes) are `launch.eval.formats`.

A *task spec* on the command line is `FORMAT:PATH`, optionally followed by `?shots=PATH` (few-shot
examples from another file of the same format) and/or `?name=NAME`, or a built-in name
(`shakespeare`, or `text` without a path: the bundled validation plays). A `text` task's PATH may
also be a token shard directory made by `python -m launch.tokenize` (documents read as token ids
from memory-mapped shards, one at a time).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launch.data.hub import DatasetSource
from launch.data.rows import HUB_PREFIX, is_saved_dataset
from launch.data.shards import (
    ShardError,
    TokenShards,
    is_shard_dir,
    open_shards,
    read_index,
    tokenizer_fingerprint,
)
from launch.data.sources import json_object
from launch.data.tokenizer import Tokenizer
from launch.eval.formats import (
    FORMATS,
    Document,
    Example,
    FieldTypeError,
    Format,
    TextRow,  # noqa: F401  (the formats' names are part of this module's API)
    TokenDocument,
)
from launch.runtime.errors import UserError

# ---------------------------------------------------------------------------------------------
# Task specs and loading

BUILTIN = {"shakespeare": "text", "text": "text"}  # name -> format; path None = bundled val plays


@dataclass
class TaskSpec:
    name: str
    format: Format
    path: Path | None  # None: the bundled Shakespeare validation plays (or `dataset`)
    shots_path: Path | None = None
    options: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None  # a saved `datasets` directory [DIR:SPLIT] or hf://NAME[/CONFIG][:SPLIT][@REV]

    @property
    def shards(self) -> bool:
        """A `text` task whose path is a token shard directory."""
        return self.path is not None and self.path.is_dir()


def parse_task_spec(spec: str) -> TaskSpec:
    spec = spec.strip()
    body, _, query = spec.partition("?")
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or key not in ("shots", "name"):
            raise UserError(f"task {spec!r}: unknown option {part!r}; expected ?shots=PATH and/or ?name=NAME")
        options[key] = value
    fmt_name, colon, path = body.partition(":")
    if not colon and fmt_name in BUILTIN:
        fmt, file = FORMATS[BUILTIN[fmt_name]], None
    elif fmt_name not in FORMATS:
        raise UserError(
            f"task {spec!r}: unknown format {fmt_name!r}; expected FORMAT:PATH with FORMAT one of "
            f"{', '.join(FORMATS)}, or a built-in task ({', '.join(BUILTIN)})"
        )
    elif not path:
        raise UserError(
            f"task {spec!r} needs a local file: {fmt_name}:/path/to/{fmt_name}.jsonl (nothing is downloaded)"
        )
    elif (
        path.startswith(HUB_PREFIX)
        or is_saved_dataset(path.rpartition(":")[0] or path)
        or is_saved_dataset(path)
    ):
        # Rows from `datasets` (read when the task is loaded): each row a dict, as a JSONL line would be.
        fmt = FORMATS[fmt_name]
        name = options.get("name") or fmt.name
        shots = Path(options["shots"]) if "shots" in options else None
        if shots is not None and not shots.is_file():
            raise UserError(f"task {spec!r}: shots file not found: {shots}")
        return TaskSpec(name, fmt, None, shots, options, dataset=path)
    else:
        fmt, file = FORMATS[fmt_name], Path(path)
        if fmt.kind == "text" and file.is_dir() and not is_shard_dir(file):
            raise UserError(
                f"task {spec!r}: {file} is a directory without index.json; expected a file or a token "
                "shard directory made by python -m launch.tokenize"
            )
        if not file.is_file() and not (fmt.kind == "text" and file.is_dir()):
            raise UserError(f"task {spec!r}: file not found: {file}")
    shots = Path(options["shots"]) if "shots" in options else None
    if shots is not None and not shots.is_file():
        raise UserError(f"task {spec!r}: shots file not found: {shots}")
    name = options.get("name") or ("shakespeare" if file is None else fmt.name)
    return TaskSpec(name, fmt, file, shots, options)


def parse_task_specs(specs: list[str]) -> list[TaskSpec]:
    """Parse specs; a format given twice is named `arc`, `arc_2`, ... unless `?name=` says otherwise."""
    out: list[TaskSpec] = []
    taken: set[str] = set()
    for s in specs:
        task = parse_task_spec(s)
        if "name" in task.options and task.name in taken:
            raise UserError(f"task name {task.name!r} (from ?name=) is used twice")
        base, i = task.name, 1
        while task.name in taken:
            i += 1
            task.name = f"{base}_{i}"
        taken.add(task.name)
        out.append(task)
    return out


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; bad JSON fails naming `path:line`."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line is {raw[e.start]:#04x})"
                ) from None
            if line.strip():
                rows.append((lineno, json_object(line, path, lineno)))
    return rows


def parse_rows(fmt: Format, path: Path, rows: Iterator[tuple[int, dict]] | None = None) -> list[Example]:
    """Examples of `rows` ((line or row number, row) pairs; default: the JSONL file `path`)."""
    examples = []
    sep = ":" if rows is None else ": row "
    for lineno, row in read_jsonl(path) if rows is None else rows:
        try:
            examples.append(fmt.parse(TextRow(row, fmt.structured)))
        except FieldTypeError as e:
            raise UserError(f"{path}{sep}{lineno}: bad {fmt.name} row: {e}") from None
        except KeyError as e:
            raise UserError(
                f"{path}{sep}{lineno}: {fmt.name} row is missing field {e}; expected fields {', '.join(fmt.fields)}"
            ) from None
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{path}{sep}{lineno}: bad {fmt.name} row: {e}") from None
    if not examples:
        raise UserError(f"{path}: no rows")
    return examples


def dataset_rows(source: str) -> Iterator[tuple[int, dict]]:
    """(row number, row) of a saved `datasets` directory or hub dataset (default split: validation,
    valid, val or test, whichever it has first; name one with :SPLIT)."""
    ds = DatasetSource(source, usage="val").open()
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


def load_examples(task: TaskSpec) -> list[Example]:
    """Every example of a task's file (for `text`: JSONL rows with 'text', or a plain-text file
    as one document; no file: the bundled validation plays, one document per play)."""
    if task.dataset is not None:
        return parse_rows(task.format, task.dataset, dataset_rows(task.dataset))
    if task.path is None:
        from launch.data.corpus import shakespeare_files

        return [Document(p.read_text(encoding="utf-8")) for p in shakespeare_files("val")]
    if task.format.kind == "text" and task.path.suffix not in (".jsonl", ".json"):
        data = task.path.read_bytes()
        try:
            return [Document(data.decode("utf-8"))]
        except UnicodeDecodeError as e:
            raise UserError(
                f"{task.path}: not UTF-8 text (byte offset {e.start} is {data[e.start]:#04x})"
            ) from None
    return parse_rows(task.format, task.path)


def open_task_shards(task: TaskSpec, tokenizer: Tokenizer) -> TokenShards:
    """The memory-mapped shards of a `text` task on a shard directory, refused when they were
    tokenized with another tokenizer than the model's (their ids would mean other pieces)."""
    want = tokenizer_fingerprint(tokenizer)
    got = read_index(task.path).get("tokenizer_sha256")
    if got != want:
        raise ShardError(
            f"task {task.name}: {task.path} was tokenized with another tokenizer (sha256 {str(got)[:12]}…) "
            f"than the model's {tokenizer.path} ({want[:12]}…): re-tokenize it with python -m launch.tokenize "
            f"tokenizer={tokenizer.path}"
        )
    return open_shards(task.path, want)


def text_documents(task: TaskSpec, tokenizer: Tokenizer) -> Iterator[Document | TokenDocument]:
    """A `text` task's documents one at a time: from a shard directory as token ids (read from
    the memory map as they are scored, so memory does not grow with the corpus), else parsed."""
    if task.shards:
        for ids in open_task_shards(task, tokenizer).documents():
            yield TokenDocument(ids)
    else:
        yield from load_examples(task)


def split_shots(task: TaskSpec, examples: list[Example], shots: int) -> tuple[list[Example], list[Example]]:
    """(few-shot examples, examples to score). Shots come from `?shots=PATH` when given, else the
    first `shots` rows are held out of scoring."""
    if shots <= 0 or task.format.kind == "text":
        return [], examples
    if task.shots_path is not None:
        pool = parse_rows(task.format, task.shots_path)
        if len(pool) < shots:
            raise UserError(f"eval.shots={shots} but {task.shots_path} has only {len(pool)} rows")
        return pool[:shots], examples
    if len(examples) <= shots:
        raise UserError(
            f"task {task.name}: eval.shots={shots} holds out the first {shots} rows of {task.path}, which "
            f"has only {len(examples)}; give a separate shots file with {task.format.name}:PATH?shots=SHOTS_PATH"
        )
    return examples[:shots], examples[shots:]
