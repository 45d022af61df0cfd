"""`python -m launch.report`: the table equals the runs' metrics.jsonl, the plots are drawn for dense,
memory, grown and sweep runs, a resumed run's repeated steps count once, a run being written is
read as far as it goes, and bad input is one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from launch import grow as grow_cli
from launch.config import config_from_file
from launch.models.build import active_params, build_model
from launch.report import plots, report_rows, write_report
from launch.report.__main__ import main as report_main
from launch.report.runs import clean_records, read_records, tokens_at
from launch.report.tables import cell
from launch.report.write import load_runs, series
from launch.runtime.errors import UserError
from launch.train.__main__ import main as train_main
from launch.train.metrics import read_metrics
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
TINY_MEMORY = REPO / "configs" / "memory" / "tiny_memory.yaml"
FAST = [
    "train.log_every=2",
    "train.val_every=2",
    "train.ckpt_every=2",
    "data.val_sequences=4",
    "train.final_val_sequences=4",
]
PNGS = ("loss_steps", "loss_tokens", "lr", "tokens_per_s")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    from launch.data.facts import FactsArgs, write_corpus

    paths = write_corpus(FactsArgs(out=str(tmp_path_factory.mktemp("facts")), n_entities=20, repeats=2))
    return [f"data.train={paths['train']}", f"data.val={paths['train']}", "model.vocab_size=512"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict[str, Path]:
    """A dense run trained in two jobs (2 steps, then resumed to 4), a memory run, and a grown memory
    run (the memory run grown to 4 blocks, trained 4 steps from it)."""
    root = tmp_path_factory.mktemp("report_runs")
    dense, memory, grown, grown_ckpt = (root / n for n in ("dense", "memory", "grown", "grown_ckpt"))
    base = [*corpus, *FAST]
    assert train_main([f"config={TINY}", f"run.dir={dense}", *base, "train.steps=2"]) == 0
    assert train_main([f"config={TINY}", f"run.dir={dense}", *base, "train.steps=4"]) == 0
    assert train_main([f"config={TINY_MEMORY}", f"run.dir={memory}", *base, "train.steps=4"]) == 0
    grow_argv = [f"checkpoint={memory}", f"out={grown_ckpt}", "grow.strategy=scalenet", "grow.adapter_rank=2"]
    assert grow_cli.main(grow_argv) == 0
    shutil.copytree(memory / "data_cache", grown / "data_cache")
    grown_argv = [f"config={grown_ckpt}/config.yaml", f"run.dir={grown}", f"train.init_from={grown_ckpt}"]
    assert train_main([*grown_argv, *FAST, "train.steps=4"]) == 0
    return {"dense": dense, "memory": memory, "grown": grown}


def _last(records: list[dict], key: str):
    return next(r[key] for r in reversed(records) if key in r)


def _png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Real runs


def test_report_of_dense_memory_and_grown_runs(runs, tmp_path):
    out = tmp_path / "report"
    md = write_report(list(runs.values()), out)
    assert md == out / "report.md"
    for name in (*PNGS, "memory", "slot_reads_memory", "slot_reads_grown"):
        assert _png(out / f"{name}.png"), name
        assert f"]({name}.png)" in md.read_text()
    rows = {r["run"]: r for r in report_rows(list(runs.values()))}
    assert list(rows) == ["dense", "memory", "grown"]
    for name, path in runs.items():
        records, row = read_metrics(path), rows[name]
        train = [r for r in records if "loss" in r]
        assert row["step"] == train[-1]["step"] == 4 and row["of"] == 4
        for key in ("tokens", "loss", "wall_s"):
            assert row[key] == train[-1][key], (name, key)
        for key in ("val_loss", "val_ppl", "final_val_loss", "final_val_ppl"):
            assert row[key] == _last(records, key), (name, key)
        assert row["tokens_per_s"] == statistics.median_high([r["tokens_per_s"] for r in train])
        assert row["peak_mem_mb"] == max(r["peak_mem_mb"] for r in train) > 10
        cfg = config_from_file(path / "config.yaml")
        with torch.device("meta"):
            model = build_model(cfg)
        assert (row["params"], row["active_params"]) == (model.num_params(), active_params(model))
        if name != "dense":
            assert row["slots_read"] == train[-1]["mem_slots_read_frac"]
            assert row["usage_entropy"] == train[-1]["mem_usage_entropy"]
    assert "slots_read" not in rows["dense"]
    assert rows["grown"]["params"] > rows["memory"]["params"]  # two more blocks (tied) plus adapters
    table = md.read_text()
    for row in rows.values():  # the Markdown cells are the rows' values, rounded for reading only
        assert f"| {row['run']} | 4 | 4 | {cell(row['tokens'])} | {cell(row['params'])} |" in table
        assert f"| {cell(row['final_val_ppl'])} |" in table
    assert "layers.1.feed_forward" in table and "layers.3.feed_forward" in table  # grown: both positions
    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and str(rows["memory"]["loss"]) in csv_lines[2]


def test_wall_time_continues_over_a_resume(runs):
    """The dense run trained in two jobs: wall_s goes on from what the step-2 checkpoint recorded."""
    train = [r for r in read_metrics(runs["dense"]) if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    state = json.loads((runs["dense"] / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert 0 < train[0]["wall_s"] < train[1]["wall_s"] <= state["wall_s"]


def test_eval_results_found_in_the_run(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["dense"], run, ignore=shutil.ignore_patterns("data_cache", "checkpoints"))
    (run / "eval").mkdir()
    tasks = {"qa": {"exact_match": 0.25, "f1": 0.5, "n": 40}}
    (run / "eval" / "results.json").write_text(json.dumps({"step": 4, "tasks": tasks}))
    (row,) = report_rows([run])
    assert (row["qa/exact_match"], row["qa/f1"]) == (0.25, 0.5) and "qa/n" not in row
    assert "| qa/exact_match | qa/f1 |" in write_report([run]).read_text()  # default out: RUN/report
    assert (run / "report" / "report.md").is_file()


def test_report_of_a_sweep_draws_each_arm_as_mean_and_band(tmp_path, corpus):
    from launch.sweep.__main__ import main as sweep_main
    from launch.sweep.collect import collect
    from launch.sweep.spec import load_sweep

    overrides = {
        k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in [*corpus, *FAST, "train.steps=4"])
    }
    body = {
        "base": str(TINY),
        "out": str(tmp_path / "runs"),
        "overrides": overrides,
        "grid": {"optim.lr": [0.001, 0.003]},
        "seeds": [0, 1],
        "report": {"plot": "curves"},
    }
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(body))
    assert sweep_main([f"sweep={path}", "mode=local"]) == 0
    sweep = load_sweep(path)
    assert len(sweep.runs) == 4

    md = write_report([sweep.out], slot_sequences=0)  # the sweep's out stands for its runs
    assert md == sweep.out / "report" / "report.md"
    for name in PNGS:
        assert _png(md.parent / f"{name}.png"), name
    rows = report_rows([sweep.out])
    assert {r["arm"] for r in rows} == {r.arm for r in sweep.runs} and len(rows) == 4
    assert "| run | arm |" in md.read_text()
    loaded = load_runs([sweep.out])
    curves = series(loaded, "val_loss", "val")
    assert len(curves) == 2 and all(label.endswith("(2 seeds)") for label in curves)
    arm = sweep.runs[0].arm
    (label,) = [lb for lb in curves if lb.startswith(arm + " ")]
    seeds = [read_records(sweep.run_dir(r)) for r in sweep.runs if r.arm == arm]
    for step, mean, std in curves[label]:
        values = [
            next(r["val_loss"] for r in recs if r["step"] == step and "val_loss" in r) for recs in seeds
        ]
        assert mean == pytest.approx(statistics.fmean(values)) and std == pytest.approx(
            statistics.stdev(values)
        )
    tokens = series(loaded, "loss", "train", x="tokens")[label]
    assert [x for x, _, _ in tokens] == [2 * 8 * 32, 4 * 8 * 32]  # batch 8 × seq_len 32 per step

    written = collect(sweep)  # the sweep's own figure comes from the same plotting module
    assert _png(written["png"])


def test_report_of_a_run_a_trainer_is_writing(tmp_path, corpus):
    """Reports of a run while its trainer writes it (metrics every step, a checkpoint every 5 with the
    one before pruned), until the trainer hangs before step 16 (LAUNCH_FAULT): the run then holds
    steps 1-15, a checkpoint at 15 and no final validation, and the report says exactly that."""
    run = tmp_path / "live"
    argv = [
        sys.executable, "-m", "launch.train", f"config={TINY_MEMORY}", f"run.dir={run}", *corpus,
        "train.steps=30", "train.log_every=1", "train.val_every=5", "train.ckpt_every=5", "train.keep_last=1",
        "data.val_sequences=2", "train.final_val_sequences=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LAUNCH_FAULT": "stall:16"}
    log = tmp_path / "train.log"
    steps_seen = []
    with (
        log.open("w") as f,
        subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT) as trainer,
    ):
        try:
            deadline = time.time() + 300
            while not (run / "checkpoints" / "step_15" / "trainer_state.json").is_file():
                assert trainer.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                if read_metrics(run):
                    md = write_report([run], tmp_path / "out", slot_sequences=4)
                    (row,) = report_rows([run])
                    assert _png(md.parent / "loss_steps.png") and row["final_val_loss"] is None
                    steps_seen.append(row["step"])
                time.sleep(0.2)
            md = write_report([run], tmp_path / "out", slot_sequences=4)
            assert trainer.poll() is None  # still running (hanging before step 16)
        finally:
            trainer.kill()
    assert steps_seen == sorted(steps_seen) and all(s is None or s <= 15 for s in steps_seen)
    (row,) = report_rows([run])
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 16))
    assert (row["step"], row["loss"], row["final_val_loss"]) == (15, records[-2]["loss"], None)
    assert row["val_loss"] == records[-1]["val_loss"]  # step 15's validation, the last record
    text = md.read_text()
    assert (
        "| live | 15 | 30 |" in text and "`live`: checkpoint step 15 read the first 4 val sequences" in text
    )
    assert _png(md.parent / "slot_reads_live.png") and _png(md.parent / "memory.png")


# ---------------------------------------------------------------------------------------------
# metrics.jsonl as a report reads it (synthesized)


def _write(path: Path, records: list[dict], tail: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _train(step: int, loss: float, **extra) -> dict:
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3,
        "tokens": 100 * step,
        "tokens_per_s": 50.0 + step,
        **extra,
    }


def test_a_resumed_run_counts_each_step_once(tmp_path):
    """First job to step 30 (checkpoint at 20, killed after 30); the second resumed at 20 and re-logged
    25 and 30 onwards without the file being cut back: its records replace the first job's."""
    first = [_train(s, 5.0 - s / 100) for s in (5, 10, 15, 20, 25, 30)]
    first.insert(4, {"step": 20, "val_loss": 4.9, "val_ppl": math.exp(4.9)})
    second = [_train(s, 4.0 - s / 100) for s in (25, 30, 35, 40)]
    second.insert(2, {"step": 30, "val_loss": 3.5, "val_ppl": math.exp(3.5)})
    second.append(
        {"step": 40, "final_val_loss": 3.2, "final_val_ppl": math.exp(3.2), "final_val_sequences": 8}
    )
    run = tmp_path / "resumed"
    _write(run, first + second)
    records = read_records(run)
    assert [(r["step"], "loss" in r) for r in records] == [
        (5, True), (10, True), (15, True), (20, True), (20, False), (25, True), (30, True), (30, False),
        (35, True), (40, True), (40, False),
    ]  # fmt: skip
    assert [r["loss"] for r in records if r["step"] in (25, 30) and "loss" in r] == [3.75, 3.7]
    (row,) = report_rows([run])
    assert (row["step"], row["loss"], row["val_loss"], row["final_val_loss"]) == (40, 3.6, 3.5, 3.2)
    train = [r for r in records if "loss" in r]
    assert row["tokens_per_s"] == statistics.median_high([r["tokens_per_s"] for r in train])
    (curve,) = series(load_runs([run]), "loss", "train").values()
    assert [x for x, _, _ in curve] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert _png(write_report([run], tmp_path / "out").parent / "loss_steps.png")


def test_clean_records_rules():
    same_step = [_train(10, 1.0), {"step": 10, "val_loss": 2.0}, {"step": 10, "eval/qa/f1": 0.1}]
    assert clean_records(same_step) == same_step  # several kinds at one step: all kept
    again = [_train(10, 1.0), _train(10, 0.5)]  # a job re-logging the step it resumed past
    assert clean_records(again) == [again[1]]
    assert clean_records([{"loss": 1.0}, {"step": "x"}, _train(2, 1.0)]) == [_train(2, 1.0)]
    kinds_apart = [_train(2, 1.0), _train(4, 0.9), {"step": 2, "val_loss": 2.0}, {"step": 4, "val_loss": 1.9}]
    assert clean_records(kinds_apart) == kinds_apart  # each kind in step order: no restart
    restart = [*kinds_apart, _train(4, 0.7)]  # training goes back to step 4: a new job from there
    assert clean_records(restart) == [kinds_apart[0], kinds_apart[2], restart[-1]]
    at = tokens_at([_train(2, 1.0), _train(4, 1.0)])
    assert (at(2), at(3), at(4), at(6)) == (200, 300, 400, 600)


def test_a_run_still_being_written(tmp_path):
    """A half-written last line (the trainer is writing it) and no final validation yet."""
    run = tmp_path / "live"
    _write(
        run,
        [_train(5, 5.0), _train(10, 4.5), {"step": 10, "val_loss": 4.4, "val_ppl": 81.0}],
        '{"step": 15, "lo',
    )
    (row,) = report_rows([run])
    assert (row["step"], row["loss"], row["val_loss"], row["final_val_loss"]) == (10, 4.5, 4.4, None)
    md = write_report([run], tmp_path / "out")
    assert _png(md.parent / "loss_steps.png") and "| live | 10 |" in md.read_text()


def test_without_matplotlib_the_table_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    run = tmp_path / "run"
    _write(run, [_train(5, 5.0)])
    md = write_report([run], tmp_path / "out")
    text = md.read_text()
    assert "matplotlib is not installed" in text and "| run | 5 |" in text
    assert not list(md.parent.glob("*.png"))


# ---------------------------------------------------------------------------------------------
# Outputs and bad input


def test_outputs_follow_the_safe_output_rule(tmp_path):
    run = tmp_path / "run"
    _write(run, [_train(5, 5.0)])
    (run / "checkpoints").mkdir()
    for bad, why in (
        (run, "is the run directory"),
        (run / "checkpoints" / "report", f"lies in {run / 'checkpoints'}, which the run"),
        (run / "metrics.jsonl", "is a file"),
    ):
        with pytest.raises(UserError, match=why):
            write_report([run], bad)
    md = write_report([run])
    assert md == run / "report" / "report.md"
    _write(run, [_train(5, 5.0), _train(10, 4.0)])
    assert "| run | 10 |" in write_report([run]).read_text()  # an earlier report is replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not written by launch.report"):
        write_report([run], other)
    assert (other / "notes.txt").read_text() == "keep"
    second = tmp_path / "elsewhere" / "run2"
    _write(second, [_train(5, 5.0)])
    with pytest.raises(UserError, match="out= is required"):
        write_report([run, second])


def test_not_a_run_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, what in (("empty", "holds no run"), ("missing", "does not exist"), ("file.txt", "is a file")):
        with pytest.raises(UserError, match=f"{path} {what}: expected a run directory"):
            report_rows([tmp_path / path])
    proc = subprocess.run(
        [sys.executable, "-m", "launch.report", str(tmp_path / "empty")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} holds no run: expected a run directory (its metrics.jsonl, run.lock or "
        "checkpoints/step_N) or a directory of run directories (a sweep's out)"
    ]


def test_cli_writes_the_report(tmp_path, capsys):
    run = tmp_path / "run"
    _write(run, [_train(5, 5.0), _train(10, 4.0)])
    assert report_main([str(run), f"out={tmp_path / 'r'}", "title=mine"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'r' / 'report.md'}"
    assert (tmp_path / "r" / "report.md").read_text().startswith("# Report: mine\n")
    with pytest.raises(UserError, match="slot_sequences=-1"):
        report_main([str(run), "slot_sequences=-1"])


def test_run_costs_continue_from_the_checkpoint_and_peak_memory_is_the_process_peak(monkeypatch):
    from launch.train import metrics

    clock = iter([100.0, 104.5])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    costs = metrics.RunCosts(torch.device("cpu"), wall_before=30.0)
    record = costs.record()
    assert record["wall_s"] == 34.5  # 30 s before the resume + 4.5 s in this job
    import resource

    assert record["peak_mem_mb"] == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 10
