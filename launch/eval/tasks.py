"""Task formats and task specs.

A *format* turns one row of a public dataset's JSONL (its own field names) into an example of one
of three kinds: `MultipleChoice` (scored by log-likelihood), `QA` (scored by greedy generation,
exact match and F1) or `Document` (perplexity). Adding a format is one function registered here:

    @register_format("myqa", "generative", fields=("q", "a"))
    def myqa(row: dict) -> QA:
        return QA(row["q"], [row["a"]])

A *task spec* on the command line is `FORMAT:PATH`, optionally followed by `?shots=PATH` (few-shot
examples from another file of the same format) and/or `?name=NAME`, or a built-in name
(`shakespeare`, or `text` without a path: the bundled validation plays). A `text` task's PATH may
also be a token shard directory made by `python -m launch.tokenize` (documents read as token ids
from memory-mapped shards, one at a time).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launch.data.shards import (
    ShardError,
    TokenShards,
    is_shard_dir,
    open_shards,
    read_index,
    tokenizer_fingerprint,
)
from launch.data.sources import HUB_PREFIX, DatasetSource, is_saved_dataset, json_object
from launch.data.tokenizer import Tokenizer
from launch.runtime.errors import UserError

# ---------------------------------------------------------------------------------------------
# Example kinds


@dataclass
class MultipleChoice:
    """One question with options; option i is scored as log P(continuation_i | context_i).

    Usually every option shares the context; WinoGrande's partial scoring shares the continuation
    instead, which is why each option carries its own pair."""

    options: list[tuple[str, str]]  # (context, continuation) per option
    label: int

    def __post_init__(self) -> None:
        self.label = label_index(self.label)
        if len(self.options) < 2:
            raise ValueError(f"needs at least 2 options, got {len(self.options)}")
        if not 0 <= self.label < len(self.options):
            raise ValueError(f"label {self.label} is out of range for {len(self.options)} options")

    def as_shot(self) -> str:
        context, continuation = self.options[self.label]
        return context + continuation

    def with_prefix(self, prefix: str) -> MultipleChoice:
        return MultipleChoice([(prefix + c, x) for c, x in self.options], self.label)


def label_index(value: Any, key: str = "label") -> int:
    """An option index from a row: an int or a string of digits. Booleans and fractional numbers
    are refused rather than truncated (`1.9` is not option 1)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"'{key}' must be an integer option index, got {value!r}")
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise ValueError(f"'{key}' must be an integer option index, got {value!r}")
        return int(value)
    if not isinstance(value, int | float):
        raise ValueError(f"'{key}' must be an integer option index, got {value!r}")
    return int(value)


@dataclass
class QA:
    """A question with one or more acceptable answers, answered by greedy generation."""

    question: str
    answers: list[str]

    def __post_init__(self) -> None:
        self.answers = [a for a in self.answers if isinstance(a, str) and a.strip()]
        if not self.answers:
            raise ValueError("has no non-empty gold answer")

    def prompt(self) -> str:
        q = self.question.strip()
        # nq_open questions come without a question mark; lm-eval's prompt adds one.
        if not q.endswith("?"):
            q += "?"
        return f"Q: {q}\nA:"

    def as_shot(self) -> str:
        return f"{self.prompt()} {self.answers[0]}"


@dataclass
class Document:
    text: str


@dataclass
class TokenDocument:
    """A document of a token shard directory: BOS + pieces + EOS, as `launch.tokenize` wrote it."""

    ids: np.ndarray


Example = MultipleChoice | QA | Document
KINDS = ("multiple_choice", "generative", "text")

# ---------------------------------------------------------------------------------------------
# The registry


# Fields that hold labels, answers or option lists rather than text: the formats check these
# themselves (`label_index`, `_answer_list`, `_choices`, `_strings`). Every other field a format
# reads goes into a prompt, where a number or null would silently become "123" or "None".
STRUCTURED_FIELDS = frozenset({"label", "answer", "answerKey", "choices", "endings"})


@dataclass(frozen=True)
class Format:
    name: str
    kind: str
    parse: Callable[[dict], Example]
    fields: tuple[str, ...]  # named in error messages
    structured: frozenset[str] = frozenset()  # fields that are not text (labels, answers, option lists)


FORMATS: dict[str, Format] = {}


def register_format(
    name: str, kind: str, fields: tuple[str, ...], structured: tuple[str, ...] | None = None
) -> Callable:
    """`structured`: the row fields that are not text (default: STRUCTURED_FIELDS); every other
    field the format reads must be a string (`TextRow`)."""
    if kind not in KINDS:
        raise ValueError(f"format kind {kind!r}: expected one of {', '.join(KINDS)}")

    def decorate(fn: Callable[[dict], Example]) -> Callable[[dict], Example]:
        if name in FORMATS:
            raise ValueError(f"format {name!r} is already registered")
        FORMATS[name] = Format(
            name, kind, fn, fields, STRUCTURED_FIELDS if structured is None else frozenset(structured)
        )
        return fn

    return decorate


# ---------------------------------------------------------------------------------------------
# Formats. Prompts follow lm-evaluation-harness's task YAMLs so numbers are comparable; options
# start with the space that separates them from the prompt (the target delimiter).


def _index_of_key(key: Any, labels: list[str]) -> int:
    """Position of an answer key among option labels; ARC mixes "A".."E" and "1".."4"."""
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    if key.isdigit() and all(lab.isalpha() for lab in labels):
        return int(key) - 1
    if key.isalpha() and len(key) == 1 and all(lab.isdigit() for lab in labels):
        return ord(key.upper()) - ord("A")
    raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")


def _choices(row: dict) -> tuple[list[str], list[str]]:
    choices = row["choices"]
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise ValueError("'choices' must be an object with lists 'text' and 'label'")
    # Labels may be numbers ("1".."4" or 1..4); texts go into the prompt and must be text.
    return _strings("choices.text", choices["text"]), [str(lab) for lab in choices["label"]]


@register_format("piqa", "multiple_choice", fields=("goal", "sol1", "sol2", "label"))
def piqa(row: dict) -> MultipleChoice:
    context = f"Question: {row['goal']}\nAnswer:"
    return MultipleChoice(
        [(context, " " + row["sol1"]), (context, " " + row["sol2"])], label_index(row["label"])
    )


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry " [title]" / "[header]"-style markup: lm-eval turns titles into sentence
    # breaks and drops the other bracketed tags.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@register_format("hellaswag", "multiple_choice", fields=("ctx", "endings", "label"))
def hellaswag(row: dict) -> MultipleChoice:
    if "ctx_a" in row and "ctx_b" in row:
        ctx = row["ctx_a"] + " " + str(row["ctx_b"]).capitalize()
    else:
        ctx = row["ctx"]
    if row.get("activity_label"):
        ctx = f"{row['activity_label']}: {ctx}"
    label = row["label"]
    if label in ("", None):
        raise ValueError("label is empty (the public test split is unlabelled: use the validation split)")
    context = _hellaswag_clean(ctx)
    endings = _strings("endings", row["endings"])
    return MultipleChoice([(context, " " + _hellaswag_clean(e)) for e in endings], label_index(label))


@register_format("boolq", "multiple_choice", fields=("question", "passage", "answer|label"))
def boolq(row: dict) -> MultipleChoice:
    if "answer" in row:
        answer = row["answer"]
        if not isinstance(answer, bool):
            raise ValueError(f"'answer' must be true or false, got {answer!r}")
        label = int(answer)
    else:
        label = label_index(row["label"])  # SuperGLUE's copy: 1 = true
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return MultipleChoice([(context, " no"), (context, " yes")], label)


@register_format("arc", "multiple_choice", fields=("question", "choices{text,label}", "answerKey"))
def arc(row: dict) -> MultipleChoice:
    texts, labels = _choices(row)
    context = f"Question: {row['question']}\nAnswer:"
    return MultipleChoice([(context, " " + t) for t in texts], _index_of_key(row["answerKey"], labels))


@register_format(
    "openbookqa", "multiple_choice", fields=("question_stem", "choices{text,label}", "answerKey")
)
def openbookqa(row: dict) -> MultipleChoice:
    texts, labels = _choices(row)
    context = row["question_stem"]
    return MultipleChoice([(context, " " + t) for t in texts], _index_of_key(row["answerKey"], labels))


@register_format("winogrande", "multiple_choice", fields=("sentence", "option1", "option2", "answer"))
def winogrande(row: dict) -> MultipleChoice:
    """Partial scoring: each option fills the blank in the context and both are scored on the
    shared rest of the sentence, so the comparison is not biased by the options' own likelihood."""
    sentence = row["sentence"]
    if sentence.count("_") != 1:
        raise ValueError(f"'sentence' must contain exactly one '_' blank, found {sentence.count('_')}")
    blank = sentence.index("_")
    suffix = " " + sentence[blank + 1 :].strip()
    options = [(sentence[:blank] + row[key], suffix) for key in ("option1", "option2")]
    answer = str(row["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(f'\'answer\' must be "1" or "2", got {row["answer"]!r}')
    return MultipleChoice(options, int(answer) - 1)


def _answer_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise FieldTypeError("answer", value, "a string or a list of strings")


@register_format("nq_open", "generative", fields=("question", "answer"))
def nq_open(row: dict) -> QA:
    return QA(row["question"], _answer_list(row["answer"]))


@register_format("triviaqa", "generative", fields=("question", "answer{value,aliases}"))
def triviaqa(row: dict) -> QA:
    answer = row["answer"]
    if not isinstance(answer, dict):
        raise ValueError("'answer' must be an object with 'value' and 'aliases'")
    if not isinstance(answer["value"], str):
        raise FieldTypeError("answer.value", answer["value"])
    golds = [
        answer["value"],
        *_strings("answer.aliases", answer.get("aliases", [])),
        *_strings("answer.normalized_aliases", answer.get("normalized_aliases", [])),
    ]
    return QA(row["question"], list(dict.fromkeys(golds)))


@register_format("facts", "generative", fields=("question", "answer"))
def facts(row: dict) -> QA:
    return QA(row["question"], _answer_list(row["answer"]))


@register_format("text", "text", fields=("text",))
def text(row: dict) -> Document:
    if not isinstance(row["text"], str):
        raise ValueError("'text' must be a string")
    return Document(row["text"])


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


class FieldTypeError(ValueError):
    def __init__(self, key: str, value: Any, what: str = "a string"):
        shown = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        super().__init__(f"field '{key}' must be {what}, got {shown}")


class TextRow(dict):
    """A JSONL row as the formats read it: a text field that is not a string fails naming the
    field. This is the one place the check lives, so a new format gets it without writing it."""

    def __init__(self, row: dict, structured: frozenset[str] = STRUCTURED_FIELDS):
        super().__init__(row)
        self.structured = structured

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if key not in self.structured and not isinstance(value, str):
            raise FieldTypeError(key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """Optional fields (`row.get`): absent or null is the default; anything else is checked."""
        return default if super().get(key) is None else self[key]


def _strings(key: str, values: Any) -> list[str]:
    """A structured field that must be a list of strings (hellaswag endings, ARC choice texts)."""
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        bad = values if not isinstance(values, list) else next(v for v in values if not isinstance(v, str))
        raise FieldTypeError(key, bad, "a list of strings")
    return values


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
