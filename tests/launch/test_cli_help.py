"""Every entry point explains itself: `--help` lists usage and every key (type, default, the
field's comment) generated from the dataclass it passes to `load_config`; `print_config=true`
prints the resolved config; `launch.train` without `config=` prints the usage and exits 2."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from launch.config import Config, load_config
from launch.config.help import help_text, key_rows
from launch.runtime.errors import CliExit
from tests.conftest import TINY, run_module

ENTRY_POINTS = [
    "launch.train",
    "launch.eval",
    "launch.grow",
    "launch.convert",
    "launch.sweep",
    "launch.facts",
    "launch.tokenizer",
    "launch.plan",  # added on another branch: checked when present
    "launch.tokenize",
    "launch.report",
    "launch.quickstart",
]


@dataclass
class _Inner:
    """A section for the test."""

    depth: int = 3  # how deep
    # a comment above the field
    # over two lines
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class _Args:
    path: str = ""  # where to read
    ratio: float | None = None
    blob: Any = None  # anything at all
    inner: _Inner = field(default_factory=_Inner)


def test_help_lists_every_key_with_type_default_and_comment():
    text = help_text(_Args, "usage: python -m x path=P")
    assert text.startswith("usage: python -m x path=P\n")
    rows = {key: (tp, default, desc) for key, tp, default, desc, _ in key_rows(_Args)}
    assert rows["path"] == ("str", '""', "where to read")
    assert rows["ratio"] == ("float | None", "null", "")
    assert rows["blob"] == ("any", "null", "anything at all")
    assert rows["inner"] == ("section", "", "A section for the test.")
    assert rows["inner.depth"] == ("int", "3", "how deep")
    assert rows["inner.names"] == ("list[str]", '["a"]', "a comment above the field over two lines")
    assert "[inner]  A section for the test." in text and "inner.depth: int = 3" in text


def test_help_and_print_config_exit_through_cli_exit():
    with pytest.raises(CliExit) as e:
        load_config(["train.steps=5", "--help"], _Args)
    assert e.value.code == 0 and "inner.depth" in e.value.text
    with pytest.raises(CliExit) as e:
        load_config(["inner.depth=7", "print_config=true"], _Args)
    assert e.value.code == 0 and yaml.safe_load(e.value.text)["inner"]["depth"] == 7
    with pytest.raises(CliExit) as e:
        load_config([], require_config=True, usage="usage: train")
    assert e.value.code == 2 and e.value.text.startswith("usage: train")
    assert load_config(["inner.depth=2"], _Args).inner.depth == 2  # no flag: an ordinary load


def test_every_training_key_has_a_description():
    """The rule for new config keys: a `# comment` on the field (the help shows it)."""
    missing = [key for key, _, _, desc, _ in key_rows(Config) if not desc]
    assert not missing, f"config keys without a `# comment`: {missing}"


def _schema_keys(module: str) -> list[str]:
    schemas = {
        "launch.train": "launch.config:Config",
        "launch.eval": "launch.eval.__main__:EvalArgs",
        "launch.grow": "launch.grow:GrowArgs",
        "launch.convert": "launch.convert.__main__:ToHFArgs",
        "launch.sweep": "launch.sweep.__main__:SweepArgs",
        "launch.facts": "launch.facts:FactsArgs",
        "launch.tokenizer": "launch.tokenizer:TokenizerArgs",
        "launch.report": "launch.report.__main__:ReportArgs",
    }
    if module not in schemas:
        return []
    mod, name = schemas[module].split(":")
    schema = getattr(importlib.import_module(mod), name)
    return [key for key, tp, *_ in key_rows(schema) if tp != "section"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_answers_help(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not on this branch")
    for flag in ("--help", "-h"):
        proc = run_module(module, flag, timeout=120)
        assert proc.stdout.startswith("usage:"), proc.stdout[:300]
        assert "error" not in proc.stderr.lower(), proc.stderr[-500:]
    for key in _schema_keys(module):
        assert f"  {key}: " in proc.stdout, f"{module} --help does not list {key}"


def test_train_without_config_prints_usage_and_exits_2(tmp_path):
    proc = run_module("launch.train", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage:") and "config=FILE is required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_module(
        "launch.train", f"config={TINY}", f"run.dir={run_dir}", "train.steps=3", "print_config=true"
    )
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["steps"] == 3 and cfg["run"]["dir"] == str(run_dir) and cfg["model"]["dim"] == 64
    assert set(cfg) == {f.name for f in dataclasses.fields(Config)}
    assert not run_dir.exists()
