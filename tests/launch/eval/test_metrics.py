import pytest

from launch.eval.qa_metrics import best_over_golds, exact_match, f1, normalize_answer


def test_normalize_hand_worked():
    # lowercase, punctuation deleted (not spaced: SQuAD's rule), articles dropped, whitespace collapsed
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("  An   apple, a Day ") == "apple day"
    assert normalize_answer("Theatre of the Absurd") == "theatre of absurd"  # "the" only as a word
    assert normalize_answer("A.") == ""


def test_exact_match():
    assert exact_match("The  Eiffel-Tower!", "eiffeltower") == 1.0
    # Deleting the hyphen joins the words, so this pair does NOT match under SQuAD rules.
    assert exact_match("The  Eiffel-Tower!", "eiffel tower") == 0.0
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0


def test_f1_partial_overlap_by_hand():
    # pred tokens {william, shakespeare, playwright}, gold {shakespeare}: P=1/3 R=1 -> F1=0.5
    assert f1("William Shakespeare, the playwright", "Shakespeare") == pytest.approx(0.5)
    # pred [new, york, city] vs gold [new, york]: P=2/3 R=1 -> 0.8
    assert f1("New York City", "new york") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [a1 a1 b]; gold [a1 b b]: overlap 2, P=R=2/3
    assert f1("paris paris rome", "paris rome rome") == pytest.approx(2 / 3)
    assert f1("london", "paris") == 0.0
    assert f1("the", "a") == 1.0  # both normalise to nothing


def test_best_over_golds_maximises_each_metric():
    em, f = best_over_golds("Leonardo", ["Leonardo da Vinci", "leonardo"])
    assert em == 1.0 and f == 1.0
    em, f = best_over_golds("da Vinci painted it", ["Leonardo da Vinci", "Michelangelo"])
    assert em == 0.0 and f == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    with pytest.raises(ValueError):
        best_over_golds("x", [])
