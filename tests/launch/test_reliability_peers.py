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
from launch.runtime.processes import child_pids
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


def _torchrun(
    run: Path,
    *extra: str,
    flags: tuple[str, ...] = (),
    launcher: str = "torch.distributed.run",
    nproc: int = 2,
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", launcher, *flags, "--standalone", f"--nproc_per_node={nproc}",
           "-m", "launch.train", *ARGS, f"run.dir={run}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
@pytest.mark.parametrize(
    ("world", "killed", "named"),
    [
        (2, 1, "rank 1 was lost"),  # the other one
        (4, 2, "rank 2 was lost"),  # named by the roll call (gloo gives only an address)
        (4, 0, "rank 0 was lost"),  # rank 0 hosted the rendezvous store: the roll call does without it
    ],
    ids=["2-ranks", "4-ranks", "store-host"],
)
def test_lost_rank_is_one_line_on_each_survivor(tmp_path, world, killed, named):
    """Ranks started by hand, without torchrun: what the survivors see when a rank on another node
    dies (torchrun would also stop them on the same node). Each prints one line naming the lost rank."""
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.train", *ARGS, "train.steps=2000", f"run.dir={run}"], cwd=REPO,
            env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        for r in range(world)
    ]  # fmt: skip
    errs = {}
    try:
        _wait_for_checkpoint(run, procs, timeout=240)
        procs[killed].kill()
        for r, p in enumerate(procs):
            if r != killed:
                errs[r] = p.communicate(timeout=120)[1]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    for r, err in errs.items():
        assert procs[r].returncode == PEER_LOST_EXIT, (r, err[-3000:])
        assert "Traceback" not in err, (r, err[-3000:])
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and f"rank {r}: " in errors[0] and named in errors[0], (r, err[-3000:])


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
    ("launcher", "flags"),
    [
        ("torch.distributed.run", ()),
        ("torch.distributed.run", ("--signals_to_handle=SIGINT,SIGHUP,SIGQUIT",)),
        ("launch.torchrun", ()),
    ],
    ids=["forwarded", "direct", "launch.torchrun"],
)
def test_sigterm_to_torchrun_checkpoints_and_resumes_bit_exactly(tmp_path, launcher, flags):
    """Plain torchrun forwards SIGTERM to its workers (and prints its own SignalException traceback,
    exit 1); with --signals_to_handle without SIGTERM it dies of it at once and the workers, watching
    their launcher, get SIGTERM from the kernel; `launch.torchrun` passes it on, waits for them with no
    deadline and ends with their status and one line. Every way: the workers' checkpoint, one line,
    and a re-run that resumes bit for bit."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    agent = _torchrun(run, "train.steps=2000", flags=flags, launcher=launcher)
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
    if launcher == "launch.torchrun":
        assert agent.returncode == 0 and "Traceback" not in err, err[-3000:]
        said = [line for line in err.splitlines() if line.startswith("launch.torchrun:")]
        assert len(said) == 1 and said[0].startswith("launch.torchrun: SIGTERM: passed to the workers"), err[
            -3000:
        ]
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
    if launcher != "launch.torchrun":
        return  # the resume is the same every way: check it once, the documented way

    total = step + 2
    resumed = _torchrun(run, f"train.steps={total}", launcher=launcher)
    reference = _torchrun(ref, f"train.steps={total}")
    for p in (resumed, reference):
        _, perr = p.communicate(timeout=300)
        assert p.returncode == 0, perr[-3000:]
    assert _losses(run)[-total:] == _losses(ref) and len(_losses(ref)) == total


def test_a_rank_that_never_comes_is_said_while_waiting_and_at_the_timeout(tmp_path):
    """Ranks started by hand, one of them never: rank 0 says it is waiting (every minute; here after
    1 s), and the timeout is one line naming the address and the world size, exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import launch.distributed.process_group as pg\n"
        "from launch.runtime.errors import run_cli\n"
        "pg.JOIN_REPORT_S = 1.0\n"
        "run_cli(lambda argv: pg.init_distributed('cpu', timeout_s=4) and 0, [])\n"
    )
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "rank 0: still waiting for the other ranks to join the process group at 127.0.0.1:" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "WORLD_SIZE=2" in errors[0] and f"127.0.0.1:{port}" in errors[0], done.stderr
