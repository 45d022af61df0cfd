"""Reliability battery, part 5: a hung rank and SLURM's time-limit warning, on 2 gloo ranks.

A rank that stops making progress ends the job within train.watchdog_s (stacks of every rank that can
still act, one line naming the stalled rank, exit 4) and a plain re-run resumes; SIGUSR1 sent to one
rank checkpoints every rank at the same step, exits 75 ("requeue me") and, with train.requeue=true
under SLURM, runs `scontrol requeue $SLURM_JOB_ID` once."""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from launch.checkpoint.paths import list_checkpoints
from launch.runtime.preemption import REQUEUE_EXIT, Preemption, decode, encode, parse_signal
from launch.train.metrics import read_metrics
from launch.train.watchdog import WATCHDOG_EXIT, collective_timeout_s

from ..conftest import REPO, TINY, run_module  # noqa: TID252

ARGS = [f"config={TINY}", "train.val_every=0", "train.log_every=1", "train.final_val_sequences=0",
        "train.ckpt_every=2"]  # fmt: skip


def test_checkpoint_signals_parse_and_a_requeue_outranks_a_stop():
    assert parse_signal("usr1") == parse_signal("SIGUSR1") == signal.SIGUSR1
    for bad in ("SIGKILL", "STOP", "SIGNOPE"):
        with pytest.raises(ValueError):
            parse_signal(bad)
    assert decode(max(encode(signal.SIGTERM), encode(signal.SIGUSR1))) == signal.SIGUSR1
    assert decode(encode(None)) is None and collective_timeout_s(0) is None and collective_timeout_s(20) == 60
    preempt = Preemption(["SIGUSR2"])
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preempt.signal == signal.SIGUSR2
    finally:
        preempt.restore()


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_with_stacks_and_the_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = run_module("launch.train", *ARGS, "train.steps=8", f"run.dir={run}", "train.watchdog_s=20",
                      nproc=2, env={"LAUNCH_FAULT": "stall:5@1"}, check=False, timeout=120)  # fmt: skip
    wall = time.monotonic() - t0
    errors = [line for line in proc.stderr.splitlines() if "error: watchdog" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    line = errors[0]
    assert "stalled: rank 1 (not in a collective)" in line and "at step 5" in line, line
    assert "rank_0.txt, rank_1.txt" in line and f"exiting {WATCHDOG_EXIT}" in line, line
    stacks = {p.name: p.read_text() for p in (run / "stacks").iterdir()}
    assert "state: waiting in a collective" in stacks["rank_0.txt"], stacks["rank_0.txt"][:2000]
    assert "faults.py" in stacks["rank_1.txt"] and "state: not in a collective" in stacks["rank_1.txt"]
    assert proc.returncode not in (0, 2), proc.returncode
    assert f"exitcode  : {WATCHDOG_EXIT}" in proc.stderr or f"exit code {WATCHDOG_EXIT}" in proc.stderr, (
        proc.stderr[-3000:]
    )
    print(f"\nstalled job ended after {wall:.1f} s of wall time (watchdog_s=20, startup included): {line}")
    assert wall < 90, wall  # startup (~10-25 s on 2 busy cores) + 20 s + the 5 s grace, not a hang

    run_module("launch.train", *ARGS, "train.steps=8", f"run.dir={run}", nproc=2, timeout=180)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 9))
    assert list_checkpoints(run)[-1][0] == 8


@pytest.mark.slow
def test_sigusr1_to_one_rank_checkpoints_every_rank_and_requeues(tmp_path):
    run, bin_dir, record = tmp_path / "run", tmp_path / "bin", tmp_path / "scontrol.args"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    scontrol.chmod(0o755)
    env = {"LAUNCH_FAULT": "sigusr1:3@1", "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = run_module("launch.train", *ARGS, "train.steps=8", f"run.dir={run}", "train.requeue=true",
                      nproc=2, env=env, check=False, timeout=180)  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-2000:]
    stops = [line for line in proc.stdout.splitlines() if "checkpointed step" in line]
    assert stops == [f"SIGUSR1: checkpointed step 3; exit {REQUEUE_EXIT} (requeue me)"], proc.stdout[-3000:]
    assert f"exitcode  : {REQUEUE_EXIT}" in proc.stderr, proc.stderr[-3000:]
    # Both ranks wrote their shards of step 3 (the odd step: the signal's checkpoint, not a periodic one).
    assert [s for s, _ in list_checkpoints(run)][-1] == 3
    shards = sorted(p.name for p in (run / "checkpoints" / "step_3" / "state").glob("*.distcp"))
    assert len(shards) == 2, shards
    assert record.read_text().split("\n") == ["requeue 4242", ""]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit not installed")
def test_sweep_slurm_job_turns_the_time_limit_warning_into_a_trainer_checkpoint(tmp_path):
    """submitit's handler calls SlurmJob.checkpoint on SLURM's warning (--signal=USR2@N): the trainer
    checkpoints and exits 75 before the job is requeued (a requeue first would end it mid-save)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from launch.sweep.runner import SlurmJob, executor_parameters
    from launch.sweep.spec import SlurmSettings

    params = executor_parameters(SimpleNamespace(name="s", slurm=SlurmSettings(gpus_per_node=0)))
    assert params["slurm_signal_delay_s"] == 120
    sbatch = _make_sbatch_string(command="x", folder=tmp_path, signal_delay_s=params["slurm_signal_delay_s"])
    assert "#SBATCH --signal=USR2@120" in sbatch

    run = tmp_path / "run"
    job = SlurmJob("sweep.yaml", "base", 1, 1, str(tmp_path), signal_delay_s=120)
    job._training = True
    # No periodic checkpoints: the one that exists afterwards is the signal's (on which step a signal
    # lands is a race, so the test must not tell them apart by the step's parity).
    train = [
        sys.executable,
        "-m",
        "launch.train",
        *ARGS,
        "train.steps=2000",
        "train.ckpt_every=0",
        f"run.dir={run}",
    ]
    job._child = subprocess.Popen(train, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        end = time.time() + 120
        while sum("loss" in r for r in read_metrics(run)) < 2:  # training is under way
            assert time.time() < end and job._child.poll() is None, "training did not start"
            time.sleep(0.2)
        resubmission = job.checkpoint()
        assert job._child.returncode == REQUEUE_EXIT
        assert pickle.loads(pickle.dumps(resubmission.function))._child is None
    finally:
        job._child.kill()
        job._child.wait()
    assert len(list_checkpoints(run)) == 1  # the signal's checkpoint
