"""Task formats: what one row of a public dataset's JSONL (its own field names) becomes.

Three kinds of example: `MultipleChoice` (scored by log-likelihood), `QA` (scored by greedy generation,
exact match and F1) and `Document` (perplexity). Adding a format is one function registered here:

    @register_format("myqa", "generative", fields=("q", "a"))
    def myqa(row: dict) -> QA:
        return QA(row["q"], [row["a"]])

Task specs (which file, how many shots) and loading rows are `launch.eval.tasks`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
# Rows as the formats read them: text fields checked to be strings, in this one place


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
