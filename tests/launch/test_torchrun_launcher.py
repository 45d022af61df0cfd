"""`python -m launch.torchrun`: torchrun whose SIGTERM, failed workers and restarts end in one line and
the workers' own status (the SIGTERM cycle itself is in test_reliability_peers)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch.checkpoint.paths import list_checkpoints
from launch.runtime.processes import child_pids
from launch.torchrun import failure_line

from ..conftest import REPO, TINY  # noqa: TID252

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
ENV.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and signals are Linux")


def _failure(code: int, timestamp: int = 100, pid: int = 1):
    return SimpleNamespace(exitcode=code, timestamp=timestamp, pid=pid)


def test_the_cause_is_the_failure_that_is_not_a_consequence():
    # torchrun saw all four in one pass (same second): the SIGKILLed rank is the cause, not rank 0
    line, status = failure_line(
        {0: _failure(3), 1: _failure(3), 2: _failure(-9, pid=42), 3: _failure(-signal.SIGTERM)}
    )
    assert status == 137
    assert line.startswith("launch.torchrun: rank 2 killed by SIGKILL (pid 42); ranks 0, 1 exited 3; rank 3 ")
    # a bad config on rank 1, its peer stopped by torchrun
    assert failure_line({0: _failure(-signal.SIGTERM), 1: _failure(2)})[1] == 2
    # only consequences: the earliest, then the lowest rank
    assert failure_line({0: _failure(3, 200), 1: _failure(3, 100)})[0].startswith(
        "launch.torchrun: rank 1 exited 3"
    )


def _start_until_checkpoint(cmd: list[str], run: Path) -> subprocess.Popen:
    """Start a training command in a session of its own; return once its first checkpoint exists."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    end = time.time() + 240
    while not list_checkpoints(run):
        if time.time() > end or proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    return proc


def _launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@linux_only
@pytest.mark.parametrize(("script", "status", "said"), [
    ("exit 75", 75, "rank 1 exited 75"),  # "requeue me" reaches the scheduler (plain torchrun: 1)
    ("sh -c 'kill -9 $PPID'", 137, "rank 1 killed by SIGKILL"),  # ($$ is torchrun's to expand)
])  # fmt: skip
def test_a_failed_worker_is_one_line_and_its_status(script, status, said):
    # rank 1 fails; rank 0 waits to be stopped by torchrun (a consequence)
    body = f'if [ "$RANK" = 1 ]; then {script}; fi; sleep 30'
    done = _launch("--nproc_per_node=2", "--no-python", "sh", "-c", body)
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("launch.torchrun:")]
    assert len(lines) == 1 and said in lines[0], done.stderr[-3000:]


@linux_only
def test_restarts_get_a_fresh_rendezvous_store_per_attempt():
    done = _launch("--nproc_per_node=1", "--max-restarts=1", "--no-python", "sh", "-c",
                   "echo store=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "store=1" in done.stdout


@linux_only
def test_a_bad_config_under_the_launcher_is_the_workers_line_and_status_2(tmp_path):
    done = _launch("--nproc_per_node=2", "-m", "launch.train", f"config={TINY}", "train.stepz=3",
                   f"run.dir={tmp_path / 'run'}")  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: unknown key 'train.stepz'"), done.stderr[-3000:]


@linux_only
@pytest.mark.slow
def test_a_checkpoint_write_failing_on_every_rank_is_one_line(tmp_path):
    """Both ranks past `ulimit -f` in DCP's write: the agreed error once (rank 0), with the likely errno."""
    import resource

    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=2", "-m", "launch.train",
           f"config={TINY}", "train.steps=4", "train.ckpt_every=2", "train.val_every=0",
           "train.final_val_sequences=0", f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    first = subprocess.run([*cmd[:-4], "train.steps=1", *cmd[-3:]], cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]  # the token cache and tokenizer, before the limit
    limit = 600 * 1024  # the config, tokenizer and small files fit; a rank's state shard does not
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "step_2" in errors[0] and "EFBIG" in errors[0], done.stderr[-3000:]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp_*"))


@linux_only
@pytest.mark.slow
def test_a_killed_rank_of_four_is_named_by_the_launcher_and_every_survivor(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=4", "-m", "launch.train",
           f"config={TINY}", "train.steps=2000", "train.ckpt_every=2", "train.val_every=0",
           "train.final_val_sequences=0", f"run.dir={run}"]  # fmt: skip
    agent = _start_until_checkpoint(cmd, run)
    try:
        workers = child_pids(agent.pid)
        environ = {w: dict(v.split(b"=", 1) for v in Path(f"/proc/{w}/environ").read_bytes().split(b"\0") if v)
                   for w in workers}  # fmt: skip
        ranks = {int(env[b"RANK"]): w for w, env in environ.items()}
        os.kill(ranks[2], signal.SIGKILL)
        _, err = agent.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 137, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("launch.torchrun:")]
    assert len(said) == 1 and said[0].startswith("launch.torchrun: rank 2 killed by SIGKILL"), err[-3000:]
    survivors = [line for line in err.splitlines() if line.startswith("error")]
    assert survivors and all("rank 2 was lost" in line for line in survivors), err[-3000:]


@linux_only
@pytest.mark.slow
def test_a_lost_rank_during_a_distributed_eval_is_one_line(tiny_checkpoint, tmp_path):
    """launch.eval under torchrun: rank 1 dies at its second scoring batch. Rank 0 either meets the loss
    in a collective and says so in one line (exit 3), or is stopped by torchrun first (SIGTERM, no
    line): a race. Either way the launcher names rank 1 and exits with its status, and no traceback."""
    fixture = REPO / "tests" / "fixtures" / "eval" / "piqa.jsonl"
    env = {**ENV, "LAUNCH_FAULT": "kill:1@1"}
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=2", "-m", "launch.eval",
           f"checkpoint={tiny_checkpoint}", f"tasks=[piqa:{fixture}]", "eval.batch_size=1", "eval.limit=8",
           "eval.sample_tokens=0"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 137, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("launch.torchrun:")]
    assert len(said) == 1 and said[0].startswith("launch.torchrun: rank 1 killed by SIGKILL"), done.stderr[
        -3000:
    ]
    survivor = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(survivor) <= 1 and all("rank 0: rank 1 was lost" in line for line in survivor), done.stderr[
        -3000:
    ]
    assert survivor or "rank 0 killed by SIGTERM" in said[0], done.stderr[-3000:]


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["-m", "launch.torchrun", "--standalone", "--nproc_per_node=2"]],
                         ids=["one-process", "launch.torchrun"])  # fmt: skip
def test_ctrl_c_is_one_line_and_status_130(tmp_path, launcher):
    """SIGINT (a terminal's Ctrl-C reaches torchrun, which passes it on): no KeyboardInterrupt traceback
    from any rank; rank 0 says it stopped; the last checkpoint stays and a re-run resumes from it."""
    run = tmp_path / "run"
    cmd = [sys.executable, *launcher, "-m", "launch.train", f"config={TINY}", "train.steps=5000", "train.ckpt_every=5",
           "train.val_every=0", "train.final_val_sequences=0", f"run.dir={run}"]  # fmt: skip
    proc = _start_until_checkpoint(cmd, run)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("interrupted (SIGINT)")]
    assert len(said) == 1, err[-3000:]
    assert list_checkpoints(run)


@linux_only
def test_a_worker_whose_launcher_died_before_it_watched_stops():
    """launch.torchrun names itself (LAUNCH_AGENT_PID): a worker that starts after its launcher died (a
    SIGTERM during the workers' start) finds another parent, a sub-reaper or pid 1, and stops."""
    code = (
        "from launch.distributed.process_group import watch_parent\n"
        "watch_parent()\n"
        "print('still here', flush=True)\n"
    )
    env = {**ENV, "TORCHELASTIC_RUN_ID": "test"}
    for agent, status, out in [(str(os.getpid()), 0, "still here"), ("1", -signal.SIGTERM, "")]:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "LAUNCH_AGENT_PID": agent},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == status, (agent, done.stderr[-2000:])
        assert done.stdout.strip() == out
