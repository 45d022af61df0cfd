"""Several torchrun agents on one machine, as on several nodes (tests/launch/test_multinode.py,
test_elastic.py): each agent is its own `torchrun --nnodes=...` process, and they meet through torchrun's
c10d rendezvous on 127.0.0.1. The agent that starts first hosts the rendezvous store (as the node
named by --rdzv_endpoint does on a cluster)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from launch.checkpoint.load import load_checkpoint
from launch.checkpoint.paths import list_checkpoints
from launch.checkpoint.read import read_trainer_state
from launch.runtime.processes import child_pids
from launch.train.metrics import read_metrics

from ..conftest import REPO  # noqa: TID252

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


class Agent:
    """One `torchrun` agent (a "node") in a session of its own; its output goes to LOG.out/.err."""

    def __init__(self, flags: list[str], args: list[str], log: Path, env: dict | None = None):
        self.log = log
        cmd = [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "launch.train", *args]
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=out, stderr=err,
                                         start_new_session=True)  # fmt: skip

    @property
    def out(self) -> str:
        return Path(f"{self.log}.out").read_text(errors="replace")

    @property
    def err(self) -> str:
        return Path(f"{self.log}.err").read_text(errors="replace")

    def workers(self) -> list[int]:
        return child_pids(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the agent, its workers and anything else in its session (cleanup)."""
        pids = [self.proc.pid, *self.workers()]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in pids:  # torchrun starts each worker in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def tail(self) -> str:
        return f"--- {self.log.name} stdout:\n{self.out[-2000:]}\n--- stderr:\n{self.err[-4000:]}"


def start_agents(
    n: int, flags: list[str], args: list[str], logs: Path, env: dict | None = None
) -> list[Agent]:
    """`n` agents with the same flags (which name --rdzv_endpoint=127.0.0.1:PORT); the first is up
    and hosting the rendezvous store before the others start, so it is the host."""
    port = int(next(f for f in flags if f.startswith("--rdzv_endpoint=")).rsplit(":", 1)[1])
    agents = [Agent(flags, args, logs / "agent0", env)]
    end = time.monotonic() + 120
    while not listening(port):
        if agents[0].proc.poll() is not None or time.monotonic() > end:
            for a in agents:
                a.kill()
            raise AssertionError(f"agent 0 never hosted the rendezvous\n{agents[0].tail()}")
        time.sleep(0.1)
    agents += [Agent(flags, args, logs / f"agent{i}", env) for i in range(1, n)]
    return agents


def wait_all(agents: list[Agent], timeout: float) -> list[int]:
    """Each agent's exit status; every agent (and worker) is killed on the way out."""
    end = time.monotonic() + timeout
    try:
        for a in agents:
            try:
                a.proc.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"agents still running after {timeout} s\n" + "\n".join(x.tail() for x in agents)
                ) from None
        return [a.proc.returncode for a in agents]
    finally:
        for a in agents:
            a.kill()


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The model weights of the run's newest checkpoint, as full tensors (whatever layout saved them)."""
    return {k: v.clone() for k, v in load_checkpoint(run).model.state_dict().items()}


def checkpoint_worlds(run: Path) -> dict[int, int]:
    """step -> the world size that saved each checkpoint of the run."""
    return {step: int(read_trainer_state(path)["world_size"]) for step, path in list_checkpoints(run)}
