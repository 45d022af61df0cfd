"""Answer normalisation, exact match and token F1 as in the official SQuAD v1.1 script (which the
NaturalQuestions-open and TriviaQA evaluations reuse): lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace. A prediction's score is its best over the gold answers."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    # Punctuation is deleted, not replaced by a space ("Eiffel-Tower" -> "eiffeltower"), exactly as
    # the SQuAD script does, so our numbers compare with published ones.
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (bag of tokens)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # Both empty counts as a match (e.g. a gold answer that is only an article).
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: Iterable[str]) -> tuple[float, float]:
    """(exact_match, f1), each maximised independently over the gold answers."""
    golds = list(golds)
    if not golds:
        raise ValueError("best_over_golds needs at least one gold answer")
    return max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds)
