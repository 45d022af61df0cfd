"""The benchmark checks themselves: they must fail on a record that measured nothing."""

from __future__ import annotations

import math

import pytest

from tests.benchmarks.checks import measured, measured_at, median_in_range, ratio_of


@pytest.mark.parametrize("bad", [None, 0, 0.0, -1.0, math.nan, math.inf, "1.0", True])
def test_measured_refuses_what_is_not_a_measured_value(bad):
    with pytest.raises(AssertionError, match="stock_ms"):
        measured(bad, "stock_ms")


def test_measured_accepts_tiny_times():
    # The issue-34 case: a quick forward on a fast CPU, far below the 0.05 ms that rounding lost.
    assert measured(3e-5) == 3e-5 and measured(2) == 2.0


def test_measured_at_fails_on_a_missing_zero_or_nan_time():
    with pytest.raises(AssertionError, match="forward.ms: missing"):
        measured_at({"forward": {}}, "forward", "ms")
    with pytest.raises(AssertionError, match="value_step: missing"):
        measured_at({"skipped": "no"}, "value_step", "ms")
    with pytest.raises(AssertionError, match="forward.ms"):
        measured_at({"forward": {"ms": 0.0}}, "forward", "ms")
    with pytest.raises(AssertionError, match="forward.ms"):
        measured_at({"forward": {"ms": math.nan}}, "forward", "ms")
    assert measured_at({"forward": {"ms": 0.01}}, "forward", "ms") == 0.01


def test_ratio_of_needs_the_unrounded_values():
    stock, ours = 0.0437, 0.0219
    ratio_of(stock / ours, stock, ours)
    with pytest.raises(AssertionError, match="speedup"):
        ratio_of(round(stock / ours, 2), stock, ours, "speedup")  # a ratio rounded for storage
    with pytest.raises(AssertionError):
        ratio_of(1.0, 0.0, 0.0)  # two times rounded to 0.0


def test_median_in_range():
    median_in_range(1.5, 1.0, 2.0)
    with pytest.raises(AssertionError, match="outside"):
        median_in_range(2.5, 1.0, 2.0)
    with pytest.raises(AssertionError):
        median_in_range(math.nan, 1.0, 2.0)
