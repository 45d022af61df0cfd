"""Logs a user can follow: plain progress lines when stdout is not a terminal (or progress=false),
namespaced TensorBoard tags with every optimizer group's LR, W&B in offline mode, and a torn last
line of metrics.jsonl that no longer breaks every later resume."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch.config import load_config
from launch.train.metrics import MetricsLogger, ProgressReporter, read_metrics, tb_tag
from tests.conftest import TINY, run_module

RECORDS = [
    {
        "step": 10,
        "loss": 4.5,
        "lr": 3e-4,
        "grad_norm": 1.2,
        "tokens": 2560,
        "tokens_per_s": 1234.5,
        "mem_slots_read_frac": 0.25,
    },
    {"step": 10, "val_loss": 4.4, "val_ppl": 81.45},
    {"step": 10, "eval/piqa/acc": 0.5, "eval/piqa/n": 4},
    {"step": 10, "final_val_loss": 4.3, "final_val_ppl": 73.7, "final_val_sequences": 64},
]


def _optimizers():
    groups = [
        {"name": "decay", "lr": 3e-4},
        {"name": "no_decay", "lr": 3e-4},
        {"name": "memory_values", "lr": 1e-3},
    ]
    return [SimpleNamespace(param_groups=groups[:2]), SimpleNamespace(param_groups=groups[2:])]


def test_tags_are_namespaced():
    assert tb_tag("loss") == "train/loss" and tb_tag("lr/memory_values") == "train/lr/memory_values"
    assert tb_tag("val_loss") == "val/loss" and tb_tag("eval/piqa/acc") == "eval/piqa/acc"
    assert (
        tb_tag("mem_slots_read_frac") == "memory/slots_read_frac"
        and tb_tag("tokens_per_s") == "train/tokens_per_s"
    )
    # the end-of-training validation sits under val/ beside the periodic one, not under train/
    assert tb_tag("final_val_loss") == "val/final_loss" and tb_tag("final_val_ppl") == "val/final_ppl"
    assert tb_tag("final_val_sequences") == "val/final_sequences"


def test_progress_lines_when_not_a_terminal(tmp_path):
    out = io.StringIO()  # not a tty
    cfg = load_config([f"config={TINY}", "train.progress=true", "train.steps=40"])
    log = MetricsLogger(tmp_path, cfg=cfg, optimizers=_optimizers(), stream=out)
    assert log.plain_progress and not log.wants_bar
    log.truncate_after(0)
    for r in RECORDS:
        log.log(r)
    log.close()
    lines = out.getvalue().splitlines()
    assert re.fullmatch(
        r"step 10/40 \| loss 4\.5000 \| lr 3\.00e-04 \| 1,234 tok/s \| ETA \d+m\d\ds", lines[0]
    ), lines[0]
    assert lines[1].startswith("step 10/40 | val_loss 4.4000 | val_ppl 81.45")
    assert lines[2] == "step 10/40 | piqa/acc=0.5"
    first = read_metrics(tmp_path)[0]  # every group's LR lands in metrics.jsonl too
    assert (first["lr/decay"], first["lr/no_decay"], first["lr/memory_values"]) == (3e-4, 3e-4, 1e-3)


def test_eta_counts_from_the_resumed_step(monkeypatch):
    clock = iter([0.0, 100.0, 160.0])  # __init__, start(), eta()
    monkeypatch.setattr("launch.train.metrics.time.perf_counter", lambda: next(clock))
    rep = ProgressReporter(total_steps=100)
    rep.start(40)  # resumed at 40; 60 s for 20 steps -> 3 s/step, 40 to go
    assert rep.eta(60) == "2m00s"


def test_tensorboard_tags_include_every_lr_group(tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config([f"config={TINY}", "train.tensorboard=true", "train.progress=false"])
    log = MetricsLogger(tmp_path, cfg=cfg, optimizers=_optimizers(), stream=io.StringIO())
    for r in RECORDS:
        log.log(r)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {
        "train/loss",
        "train/lr/decay",
        "train/lr/no_decay",
        "train/lr/memory_values",
        "train/tokens_per_s",
        "val/loss",
        "val/ppl",
        "val/final_loss",
        "val/final_ppl",
        "eval/piqa/acc",
        "memory/slots_read_frac",
    }
    assert want <= tags, want - tags
    assert not any(t.startswith("train/final") for t in tags)
    assert "train/lr" not in tags and "loss" not in tags
    assert acc.Scalars("train/lr/memory_values")[0].value == pytest.approx(1e-3)


def test_wandb_offline_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config([f"config={TINY}", "train.wandb=memscale-test", "train.progress=false", "run.name=t1"])
    ids = []
    for _ in range(2):  # a resumed run continues the same W&B run id
        log = MetricsLogger(tmp_path, cfg=cfg, optimizers=_optimizers(), stream=io.StringIO())
        run, sent = log._wandb, {}
        ids.append(run.id)
        real_log = run.log
        run.log = lambda data, step=None, sent=sent, real_log=real_log: (
            sent.update(data),
            real_log(data, step=step),
        )
        for r in RECORDS:
            log.log(r)
        log.close()
        summary = sent  # what reached wandb.log, under the namespaced tags
        assert summary["train/loss"] == 4.5 and summary["train/lr/memory_values"] == 1e-3
        assert summary["val/loss"] == 4.4 and summary["eval/piqa/acc"] == 0.5 and "loss" not in summary
        assert summary["val/final_loss"] == 4.3 and "train/final_val_loss" not in summary
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    # two starts within one second share an offline directory: the run id is what must be shared
    assert ids == [run_id, run_id]
    assert runs and all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)


def test_missing_wandb_or_tensorboard_fails_in_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_such(name, *a, **k):
        if name in ("wandb", "torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_such)
    from launch.runtime.errors import UserError

    for key in ("train.wandb=p", "train.tensorboard=true"):
        cfg = load_config([f"config={TINY}", key])
        with pytest.raises(UserError, match=r"pip install 'memscale\[(wandb|tensorboard)\]'"):
            MetricsLogger(tmp_path, cfg=cfg)


def test_torn_tail_is_moved_aside_saying_so(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 5, "loss": 1.0})
        + "\n"
        + json.dumps({"step": 10, "loss": 0.9})
        + '\n{"step": 15, "lo'
    )
    log = MetricsLogger(tmp_path)
    log.truncate_after(10)
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10]
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 15, "lo\n'  # kept, not lost
    assert "moved 1 unparsable line" in capsys.readouterr().err
    log.log({"step": 11, "loss": 0.8})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10, 11]


@pytest.mark.slow
def test_training_resumes_after_a_torn_metrics_line_and_prints_plain_lines(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"config={TINY}",
        f"run.dir={run_dir}",
        "train.progress=true",
        "train.ckpt_every=4",
        "train.log_every=2",
    ]
    first = run_module("launch.train", *args, "train.steps=4")
    # stdout is a pipe, not a terminal: plain lines, no tqdm bar
    assert re.search(r"^step 2/4 \| loss \d+\.\d{4} \| lr \S+ \| [\d,]+ tok/s \| ETA ", first.stdout, re.M), (
        first.stdout
    )
    assert "train:" not in first.stderr and "\r" not in first.stderr
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.')  # killed mid-write
    second = run_module("launch.train", *args, "train.steps=6")
    assert "metrics.jsonl.torn" in second.stderr
    assert re.search(r"^step 6/6 \| loss ", second.stdout, re.M)
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [2, 4, 6]
    assert Path(str(run_dir / "metrics.jsonl") + ".torn").is_file()
