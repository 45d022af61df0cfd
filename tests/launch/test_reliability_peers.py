"""Reliability battery, part 4: signals and lost peers under several processes (gloo on CPU).

A lost rank is one line on each survivor (exit 3); a `kill -9` of torchrun leaves no orphan
workers (they watch their launcher and checkpoint); SIGTERM to torchrun ends with the workers'
checkpoint, and the re-run resumes bit for bit."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.checkpoint.paths import list_checkpoints
from launch.distributed.process_group import PEER_LOST_EXIT
from launch.sweep.runner import child_pids
from launch.train.metrics import read_metrics

from ..conftest import REPO, TINY  # noqa: TID252

pytestmark = pytest.mark.slow
ARGS = [f"config={TINY}", "train.ckpt_every=2", "train.val_every=0", "train.log_every=1",
        "train.final_val_sequences=0", "optim.schedule=constant"]  # fmt: skip
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _wait_for_checkpoint(run: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    end = time.time() + timeout
    while not list_checkpoints(run):
        assert time.time() < end and all(p.poll() is None for p in procs), "no checkpoint appeared"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _torchrun(run: Path, *extra: str, flags: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *flags, "--standalone", "--nproc_per_node=2",
           "-m", "launch.train", *ARGS, f"run.dir={run}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_lost_rank_is_one_line_on_the_survivor(tmp_path):
    """Two ranks without torchrun (what a survivor sees when a rank on another node dies)."""
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.train", *ARGS, "train.steps=2000", f"run.dir={run}"], cwd=REPO,
            env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        for r in range(2)
    ]  # fmt: skip
    try:
        _wait_for_checkpoint(run, procs)
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == PEER_LOST_EXIT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "rank 1 was lost" in errors[0], err[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_kill_9_of_torchrun_leaves_no_orphan_workers(tmp_path):
    run = tmp_path / "run"
    # No periodic checkpoints: any checkpoint that exists afterwards is the workers' pre-emption one
    # (with periodic ones, which step the stop lands on is a race a test must not depend on).
    agent = _torchrun(run, "train.steps=2000", "train.ckpt_every=0")
    try:
        end = time.time() + 120
        while len(_losses(run)) < 2:  # training is under way
            assert time.time() < end and agent.poll() is None, "training did not start"
            time.sleep(0.2)
        workers = child_pids(agent.pid)
        assert len(workers) == 2, workers
        agent.kill()
        agent.communicate()
        end = time.time() + 60
        while any(_alive(w) for w in workers) and time.time() < end:
            time.sleep(0.2)
        alive = [w for w in workers if _alive(w)]
    finally:
        _kill_session(agent)  # the workers share torchrun's session: nothing outlives the test
    assert not alive, f"workers {alive} outlived a kill -9 of torchrun"
    steps = [s for s, _ in list_checkpoints(run)]
    assert len(steps) == 1 and steps[0] >= 2, steps  # the checkpoint they wrote on their way out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
@pytest.mark.parametrize(
    "flags", [(), ("--signals_to_handle=SIGINT,SIGHUP,SIGQUIT",)], ids=["forwarded", "direct"]
)
def test_sigterm_to_torchrun_checkpoints_and_resumes_bit_exactly(tmp_path, flags):
    """torchrun forwards SIGTERM to its workers (and prints its own SignalException traceback, exit 1);
    with --signals_to_handle without SIGTERM it dies of it at once and the workers, watching their
    launcher, get SIGTERM from the kernel: no traceback at all. Either way: the workers' checkpoint,
    one line, and a re-run that resumes bit for bit."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    agent = _torchrun(run, "train.steps=2000", flags=flags)
    try:
        _wait_for_checkpoint(run, [agent])
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=120)
    finally:
        _kill_session(agent)
    worker_err = [line for line in err.splitlines() if line.startswith("[rank")]
    assert not any("Traceback" in line for line in worker_err), err[-3000:]
    stops = [line for line in out.splitlines() if re.match(r"SIGTERM.*: checkpointed step \d+", line)]
    assert len(stops) == 1, out[-2000:]
    if flags:
        assert agent.returncode == -signal.SIGTERM and "Traceback" not in err, err[-3000:]
        # their launcher died: "not finished" (75), which other agents of a multi-node job restart on
        assert stops[0].startswith("SIGTERM (a torchrun agent died):") and stops[0].endswith(
            "exit 75 (requeue me)"
        )
    else:
        assert stops[0].startswith("SIGTERM: ") and stops[0].endswith("; exiting"), stops
    step = int(re.search(r"checkpointed step (\d+)", stops[0]).group(1))
    end = time.time() + 60
    while (not list_checkpoints(run) or list_checkpoints(run)[-1][0] < step) and time.time() < end:
        time.sleep(0.2)
    assert list_checkpoints(run)[-1][0] == step
    if not flags:
        return  # the resume is the same either way: check it once

    total = step + 2
    resumed = _torchrun(run, f"train.steps={total}")
    reference = _torchrun(ref, f"train.steps={total}")
    for p in (resumed, reference):
        _, perr = p.communicate(timeout=300)
        assert p.returncode == 0, perr[-3000:]
    assert _losses(run)[-total:] == _losses(ref) and len(_losses(ref)) == total
