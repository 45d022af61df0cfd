"""Reliability battery, part 2: requeue cycles, concurrency, resume guards, resource failures.

These run the trainer for real (subprocesses where a process must die); tiny configs and steps."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.checkpoint.paths import list_checkpoints
from launch.runtime.run_dir import LOCK_FILE, acquire_lock
from launch.train import __main__ as train_cli
from launch.train.metrics import read_metrics

from ..conftest import REPO, TINY, run_module  # noqa: TID252
from ._reliability import cli_error, digest

CYCLE = [
    "train.steps=10",
    "train.ckpt_every=1",
    "train.keep_last=2",
    "train.val_every=0",
    "train.log_every=1",
]


def _train(run_dir: Path, *args: str, env: dict | None = None, **kw):
    return run_module(
        "launch.train", f"config={TINY}", f"run.dir={run_dir}", *args, env=env, check=False, **kw
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


def _dcp_flat(ckpt: Path, scratch: Path) -> dict:
    """A checkpoint's whole DCP state (weights, optimizer state and param groups) as one flat dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "state", scratch)
    flat, todo = {}, list(torch.load(scratch, weights_only=False).items())  # our own test output
    while todo:
        k, v = todo.pop()
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            todo += [(f"{k}/{kk}", vv) for kk, vv in v.items()]
        else:
            flat[k] = v
    return flat


def test_requeue_cycles_end_bit_identical_to_an_uninterrupted_run(tmp_path):
    """run -> kill -9 -> resume -> prune -> crash mid-save -> resume -> kill -9 -> resume, with
    keep_last=2 and a checkpoint every step: the way a pre-empted SLURM job lives."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = _train(ref, *CYCLE)
    assert proc.returncode == 0, proc.stderr
    # Each cycle dies at a different point; every resume outlives the checkpoint it resumed from
    # (keep_last=2 prunes it), which is what once broke the tokenizer copy.
    for fault in ("kill:3", "crash_in_save:6", "kill:8"):
        proc = _train(run, *CYCLE, env={"LAUNCH_FAULT": fault})
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert len(list_checkpoints(run)) <= 2
    proc = _train(run, *CYCLE)  # the last requeue: also proves a kill -9'd job's lock is gone
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout

    assert _losses(run) == _losses(ref) and [s for s, _ in _losses(run)] == list(range(1, 11))
    assert [s for s, _ in list_checkpoints(run)] == [9, 10]
    # every weight and optimizer moment bit-identical; hyperparameters equal
    a, b = (
        _dcp_flat(ref / "checkpoints/step_10", tmp_path / "a.pt"),
        _dcp_flat(run / "checkpoints/step_10", tmp_path / "b.pt"),
    )
    assert (
        a.keys() == b.keys()
        and any(k.startswith("model/") for k in a)
        and any(k.startswith("optim") for k in a)
    )
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:  # (betas come back as a list after a resume)
            assert _plain(a[k]) == _plain(b[k]), k
    # the run's tokenizer lives in the run dir and in every checkpoint, all the same bytes
    tok = (run / "tokenizer.model").read_bytes()
    assert all((p / "tokenizer.model").read_bytes() == tok for _, p in list_checkpoints(run))
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_resuming_below_the_checkpoint_step_is_refused(capsys, tiny_checkpoint):
    before = digest(tiny_checkpoint)
    cli_error(
        capsys,
        train_cli.main,
        [f"config={TINY}", f"run.dir={tiny_checkpoint}", "train.steps=5"],
        "train.steps=5",
        "step 20",
        "unchanged",
    )
    after = digest(tiny_checkpoint)
    after.pop(LOCK_FILE, None), before.pop(LOCK_FILE, None)
    assert after == before  # config.yaml, metrics and checkpoints untouched


_HOLDER = "import sys, time; from launch.runtime.run_dir import acquire_lock; acquire_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)"


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_trainer_on_a_run_dir_is_refused_and_a_killed_holder_never_blocks(capsys, tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        line = cli_error(
            capsys,
            train_cli.main,
            [f"config={TINY}", f"run.dir={run}", *CYCLE],
            f"run.dir={run}",
            f"pid {holder.pid}",
            "on host",
        )
        assert "in use" in line
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    acquire_lock(run).release()  # the kernel dropped the dead holder's flock: no stale lock


def test_two_real_trainers_on_one_run_dir(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.train",
            f"config={TINY}",
            f"run.dir={run}",
            "train.steps=100000",
            "train.ckpt_every=0",
            "train.val_every=0",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while f"pid {first.pid} " not in (
            (run / LOCK_FILE).read_text() if (run / LOCK_FILE).is_file() else ""
        ):
            assert time.time() < deadline and first.poll() is None, "first trainer never took the lock"
            time.sleep(0.2)
        second = _train(run, "train.steps=2")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"run.dir={run} is in use by pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first trainer is unharmed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    proc = _train(run, "train.steps=2", "train.val_every=0")  # the requeue after kill -9 is not blocked
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_locked_run_dir_fails_every_rank_without_hanging(tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        proc = run_module(
            "launch.train",
            f"config={TINY}",
            f"run.dir={run}",
            "train.steps=2",
            nproc=2,
            check=False,
            timeout=180,
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode != 0
    assert f"is in use by pid {holder.pid}" in proc.stderr


def _limit_file_size(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_full_disk_while_writing_the_run_config(tmp_path):
    """`ulimit -f` (a quota, a full disk): one line naming the file; the config and checkpoints intact."""
    run = tmp_path / "run"
    proc = _train(run, "train.steps=2", "train.val_every=0")
    assert proc.returncode == 0, proc.stderr
    before = digest(run)
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        f"config={TINY}",
        f"run.dir={run}",
        "train.steps=3",
        "train.val_every=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=_limit_file_size(1000), timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(run / "config.yaml") in proc.stderr and "File too large" in proc.stderr
    after = digest(run)
    after.pop(LOCK_FILE, None), before.pop(LOCK_FILE, None)
    assert after == before


def _read_only(path: Path, on: bool) -> None:
    """chmod for a normal user; root ignores modes, so the directory is made immutable instead."""
    if os.geteuid() != 0:
        path.chmod(0o555 if on else 0o755)
        return
    proc = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    if proc.returncode != 0 and on:
        pytest.skip("running as root without chattr: cannot make a directory read-only")


def test_read_only_run_dir(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "train.steps=2", "train.val_every=0")
    assert proc.returncode == 0, proc.stderr
    before = digest(run)
    _read_only(run, True)
    try:
        proc = _train(run, "train.steps=3", "train.val_every=0")
    finally:
        _read_only(run, False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(run / "config.yaml") in proc.stderr
    assert "Permission denied" in proc.stderr or "Operation not permitted" in proc.stderr
    after = digest(run)
    after.pop(LOCK_FILE), before.pop(LOCK_FILE)  # the lock file records its latest holder
    assert after == before
