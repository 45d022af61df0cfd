"""The checks every benchmark smoke test makes on what a benchmark measured.

They hold on any machine: a measured time is a positive finite number, and a stored ratio equals the
ratio of the stored times. Never a threshold (a time below X, a speed-up above Y): a faster or slower
CPU crosses those, which is how a smoke test broke on a CPU where a forward took < 0.05 ms (issue 34)."""

from __future__ import annotations

import math


def measured(value, what: str = "time") -> float:
    """`value` as a measured quantity (a time, a rate, a ratio of two times): a positive finite number.
    Raises AssertionError otherwise, naming `what`; a missing value (None), 0, NaN and inf all fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"{what}: {value!r} is not a number")
    if not math.isfinite(value) or value <= 0:
        raise AssertionError(f"{what}: {value!r} is not a measured value (a positive finite number)")
    return float(value)


def measured_at(record: dict, *keys: str) -> float:
    """The measured value at a path of keys in `record` (`measured_at(rec, "forward", "ms")`); a missing
    key fails like a zero or NaN does."""
    value = record
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise AssertionError(
                f"{'.'.join(keys[: i + 1])}: missing from the record (keys: {sorted(record)})"
            )
        value = value[key]
    return measured(value, ".".join(keys))


def ratio_of(ratio, numerator, denominator, what: str = "ratio") -> None:
    """A stored ratio is the ratio of the stored (unrounded) values it was computed from. The tolerance
    is floating-point noise only: a ratio of rounded times would miss it."""
    measured(ratio, what)
    expected = measured(numerator, f"{what} numerator") / measured(denominator, f"{what} denominator")
    if not math.isclose(ratio, expected, rel_tol=1e-9):
        raise AssertionError(f"{what}: {ratio!r} != {numerator!r} / {denominator!r} = {expected!r}")


def median_in_range(median, lo, hi, what: str = "median") -> None:
    """A median over pairs lies within the pairs' range, all of them measured."""
    for v, name in ((median, what), (lo, f"{what} range low"), (hi, f"{what} range high")):
        measured(v, name)
    if not lo <= median <= hi:
        raise AssertionError(f"{what}: {median!r} outside its range [{lo!r}, {hi!r}]")


def result_record(rec: dict, name: str) -> dict:
    """The one result record every benchmark writes: {name, date, git_sha, machine: {cpu, cores, isa,
    torch, ...}, args, rows}. Structure only: what was measured is checked by the test that ran it."""
    missing = {"name", "date", "git_sha", "machine", "args", "rows"} - rec.keys()
    if missing:
        raise AssertionError(f"{name}: the record lacks {sorted(missing)}")
    if rec["name"] != name:
        raise AssertionError(f"record name {rec['name']!r}, expected {name!r}")
    m = rec["machine"]
    for key in ("cpu", "cores", "isa", "torch"):
        if key not in m:
            raise AssertionError(f"{name}: machine lacks {key!r} ({sorted(m)})")
    if not isinstance(rec["args"], dict) or not isinstance(rec["rows"], list) or not rec["rows"]:
        raise AssertionError(f"{name}: args must be a dict and rows a non-empty list")
    return rec
