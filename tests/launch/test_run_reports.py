"""What the trainer says when a run does not start from scratch: a resume whose train.steps differs
from the checkpoint's run (the LR schedule is a function of train.steps), and train.init_from."""

from __future__ import annotations

import dataclasses

from launch.checkpoint.read import checkpoint_steps, init_from_line
from launch.config import load_config
from launch.train.optim import lr_multiplier, schedule_change
from tests.conftest import TINY


def test_schedule_change_names_both_lengths_and_the_lr_jump():
    cfg = load_config([f"config={TINY}", "train.steps=40"])  # cosine, warmup 2, lr 3e-3
    assert schedule_change(40, 20, cfg) is None and schedule_change(None, 20, cfg) is None
    line = schedule_change(20, 20, cfg)
    old = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=20))
    assert line == (
        "train.steps changed from 20 (the checkpoint's run) to 40: the cosine LR schedule is stretched to "
        f"40 steps (LR at step 20: {3e-3 * lr_multiplier(20, old):.2e} on the old schedule, "
        f"{3e-3 * lr_multiplier(20, cfg):.2e} now)"
    )
    assert "3.00e-04 on the old schedule" in line  # the old run had decayed to min_lr_ratio * lr
    assert "shortened to 40 steps" in schedule_change(80, 20, cfg)
    constant = load_config([f"config={TINY}", "train.steps=40", "optim.schedule=constant"])
    assert schedule_change(20, 20, constant).endswith("the constant LR schedule is unaffected")


def test_checkpoint_steps_reads_the_checkpoints_config(tmp_path):
    (tmp_path / "config.yaml").write_text("run:\n  dir: x\ntrain:\n  steps: 123\n  renamed_key: 1\n")
    assert checkpoint_steps(tmp_path) == 123
    (tmp_path / "config.yaml").write_text(": not yaml [")
    assert checkpoint_steps(tmp_path) is None
    assert checkpoint_steps(tmp_path / "missing") is None


def test_init_from_line_says_what_was_loaded(tmp_path):
    state = {"step": 200, "data": {"consumed": 1600}}
    line = init_from_line(tmp_path, state, reset_data=False)
    assert line == (
        f"init_from: loaded weights only from {tmp_path} (step 200); fresh optimizer, LR schedule and step "
        "counter from 0; data position continued from the checkpoint (1600 sequences already read)"
    )
    grown = {"step": 0, "data": None, "grown_from": {"checkpoint": "runs/a/checkpoints/step_9", "step": 9}}
    line = init_from_line(tmp_path, grown, reset_data=True)
    assert "(step 0, grown from step 9 of runs/a/checkpoints/step_9)" in line
    assert line.endswith("data stream restarted from the beginning (train.reset_data=true)")


def test_resume_and_init_from_print_their_lines(tmp_path, capsys):
    from launch.train.__main__ import main as train_main

    base = [f"config={TINY}", "train.final_val_sequences=2", "train.val_every=0", "train.log_every=2"]
    run = tmp_path / "run"
    assert train_main([*base, f"run.dir={run}", "train.steps=2"]) == 0
    capsys.readouterr()
    assert train_main([*base, f"run.dir={run}", "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints' / 'step_2'} at step 2; train.steps changed from 2 " in out
    assert "to 4: the cosine LR schedule is stretched to 4 steps (LR at step 2: " in out
    assert train_main([*base, f"run.dir={tmp_path / 'b'}", f"train.init_from={run}", "train.steps=1"]) == 0
    out = capsys.readouterr().out
    assert f"init_from: loaded weights only from {run / 'checkpoints' / 'step_4'} (step 4);" in out
    assert "(32 sequences already read)" in out  # 4 steps of data.batch_size 8
