"""Reliability battery, part 3: nonsense that used to be accepted silently, and eval task files with
bad data. Each case: exit 2, one line naming the culprit, no traceback, the user's files untouched."""

from __future__ import annotations

import json

import pytest

from launch import grow as grow_cli
from launch.eval import __main__ as eval_cli
from launch.runtime.errors import run_cli
from launch.train import __main__ as train_cli
from launch.train.metrics import read_metrics

from ..conftest import TINY  # noqa: TID252
from ._reliability import cli_error, digest


@pytest.mark.parametrize(
    "fmt,row,culprit",
    [
        ("piqa", {"goal": 123, "sol1": "a", "sol2": "b", "label": 0}, "'goal'"),
        ("piqa", {"goal": "g", "sol1": None, "sol2": "b", "label": 0}, "'sol1'"),
        ("nq_open", {"question": ["what"], "answer": "x"}, "'question'"),
        ("nq_open", {"question": "q", "answer": 5}, "'answer'"),
        ("arc", {"question": "q", "choices": {"text": ["a", 2], "label": ["A", "B"]}, "answerKey": "A"},
         "'choices.text'"),
        ("hellaswag", {"ctx": "c", "endings": ["a", None], "label": 0}, "'endings'"),
        ("triviaqa", {"question": "q", "answer": {"value": 3, "aliases": []}}, "'answer.value'"),
        ("text", {"text": {"a": 1}}, "'text'"),
    ],
)  # fmt: skip
def test_non_string_task_fields_are_named(capsys, tmp_path, tiny_checkpoint, fmt, row, culprit):
    path = tmp_path / f"{fmt}.jsonl"
    good = {"piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}}.get(fmt)
    path.write_text((json.dumps(good) + "\n" if good else "") + json.dumps(row) + "\n")
    before = digest(tmp_path)
    line = cli_error(
        capsys, eval_cli.main,
        [f"checkpoint={tiny_checkpoint}", f"tasks=[{fmt}:{path}]", "eval.sample_tokens=0", "progress=false"],
        str(path), culprit,
    )  # fmt: skip
    assert f":{2 if good else 1}:" in line  # the row's line number
    assert digest(tmp_path) == before


@pytest.mark.parametrize("content", ["", '{"text": ""}\n{"text": ""}\n'])
def test_empty_text_task_is_refused_not_nan(capsys, tmp_path, tiny_checkpoint, content):
    path = tmp_path / ("empty.jsonl" if content.startswith("{") else "empty.txt")
    path.write_text(content)
    out = tmp_path / "out"
    cli_error(
        capsys, eval_cli.main,
        [f"checkpoint={tiny_checkpoint}", f"tasks=[text:{path}]", "eval.sample_tokens=0", f"out={out}"],
        str(path), "no text to score",
    )  # fmt: skip
    assert not (out / "results.json").exists()


def test_eval_device_errors_name_the_eval_key(capsys, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    line = cli_error(capsys, eval_cli.main, [f"checkpoint={tiny_checkpoint}", "device=cuda"], "device=cuda")
    assert "train.device" not in line
    # the key under the wrong section: the message points at the one that exists
    cli_error(
        capsys, eval_cli.main, [f"checkpoint={tiny_checkpoint}", "eval.device=cuda"], "did you mean 'device'"
    )
    cli_error(capsys, train_cli.main, [f"config={TINY}", "device=cpu"], "did you mean 'train.device'")


@pytest.mark.parametrize("opts", [["grow.depth=1"], ["grow.depth=2"], ["grow.mapping=[0]"]])
def test_grow_refuses_a_depth_that_does_not_grow(capsys, tmp_path, tiny_checkpoint, opts):
    before = digest(tiny_checkpoint)
    out = tmp_path / "grown"
    argv = [f"checkpoint={tiny_checkpoint}", f"out={out}", "grow.strategy=scalenet", *opts]
    cli_error(capsys, grow_cli.main, argv, "not more than the source's 2")
    assert digest(tiny_checkpoint) == before
    assert not out.exists() or not any(out.iterdir())


def test_rerunning_a_finished_run_appends_nothing(capsys, tmp_path):
    run = tmp_path / "run"
    argv = [f"config={TINY}", f"run.dir={run}", "train.steps=2", "train.final_val_sequences=4"]
    with pytest.raises(SystemExit) as exc:
        run_cli(train_cli.main, argv)
    assert exc.value.code == 0
    finals = [r for r in read_metrics(run) if "final_val_loss" in r]
    assert len(finals) == 1
    before = {k: v for k, v in digest(run).items() if k != "run.lock"}  # the lock names its holder's pid
    for _ in range(2):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_cli(train_cli.main, argv)
        assert exc.value.code == 0
        assert "already finished at step 2" in capsys.readouterr().out
    assert {
        k: v for k, v in digest(run).items() if k != "run.lock"
    } == before  # metrics.jsonl, config.yaml, checkpoints: byte-identical


def test_a_final_validation_cut_short_runs_once_on_rerun(capsys, tmp_path):
    """Killed after the last checkpoint but before the final validation was logged: not finished."""
    run = tmp_path / "run"
    argv = [f"config={TINY}", f"run.dir={run}", "train.steps=2", "train.final_val_sequences=4"]
    with pytest.raises(SystemExit):
        run_cli(train_cli.main, argv)
    records = [r for r in read_metrics(run) if "final_val_loss" not in r]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(train_cli.main, argv)
    assert "done: step 2" in capsys.readouterr().out
    assert len([r for r in read_metrics(run) if "final_val_loss" in r]) == 1
