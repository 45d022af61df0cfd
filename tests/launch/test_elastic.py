"""Elastic restarts through torchrun (gloo on CPU, two agents on one machine as two nodes).

Two agents (`--nnodes=1:2 --max-restarts=3`, c10d rendezvous) train; mid-run the second one is lost:
- `agent+worker` (its node dies: both SIGKILLed): the survivor's rank stops on the lost peer (exit 3),
  its agent restarts it, the rendezvous closes with one node, and the trainer resumes from the newest
  checkpoint at world size 1 (DCP reshards it);
- `agent` (only torchrun SIGKILLed): its orphaned worker is told by the kernel (PR_SET_PDEATHSIG), every
  rank checkpoints and exits 75, never 0, and the survivor's agent restarts at world size 1;
- `worker` (only the worker SIGKILLed): both agents restart their workers, world size stays 2.

Each time the job finishes, metrics.jsonl holds every step once, and the final weights equal an
uninterrupted run's: to float tolerance across the world-size change, bit for bit without one.
Each test prints the restart time it measured (`pytest -s`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from launch.checkpoint.paths import list_checkpoints
from launch.distributed import process_group
from launch.distributed.process_group import PEER_LOST_EXIT, shared_store_warning
from launch.runtime import faults
from launch.runtime.errors import UserError
from launch.runtime.preemption import REQUEUE_EXIT
from launch.runtime.run_dir import acquire_lock, restart_lock_wait_s
from launch.train.metrics import read_metrics

from ..conftest import TINY, run_module  # noqa: TID252
from ._agents import checkpoint_worlds, final_weights, free_port, losses, start_agents, wait_all

agents_test = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux"
)
STEPS = 30
ARGS = [f"config={TINY}", f"train.steps={STEPS}", "train.log_every=1", "train.val_every=0", "train.ckpt_every=5",
        "train.keep_last=10", "train.final_val_sequences=0", "train.watchdog_s=20"]  # fmt: skip
# As docs/parallelism.md says: torchrun's shared store breaks restarts (launch.distributed.process_group.
# shared_store_warning). LAUNCH_FAULT paces the steps: a 30-step run lasts long enough to be hit mid-way.
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LAUNCH_FAULT": "slow:0.15"}
KILL_AFTER = 10  # the lost agent goes once a checkpoint of this step (or later) exists at world size 2


def elastic_flags(port: int) -> list[str]:
    """What docs/parallelism.md shows, with timeouts sized for a test: the rendezvous waits 5 s for
    late nodes (last_call_timeout) and notices a dead one after 3 missed 1-s heartbeats."""
    conf = "join_timeout=60,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"
    return ["--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3", "--monitor-interval=0.5",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=elastic{port}",
            f"--rdzv_conf={conf}"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one_process")
    run_module("launch.train", *ARGS, f"run.dir={run}")
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("two_ranks")
    run_module("launch.train", *ARGS, f"run.dir={run}", nproc=2)
    return run


def _run_and_lose_one(tmp_path: Path, victim: str) -> tuple[Path, list, float, float]:
    """Two agents train; the second loses `victim` once a world-2 checkpoint of step >= KILL_AFTER
    exists. Returns the run, the agents, the kill time, and the time the resumed training logged its
    first step (time.monotonic())."""
    run = tmp_path / "run"
    agents = start_agents(2, elastic_flags(free_port()), [*ARGS, f"run.dir={run}"], tmp_path, AGENT_ENV)
    lost = agents[1]
    try:
        end = time.monotonic() + 120
        while not any(s >= KILL_AFTER and w == 2 for s, w in checkpoint_worlds(run).items()):
            assert time.monotonic() < end, "no world-2 checkpoint\n" + "\n".join(a.tail() for a in agents)
            assert all(a.proc.poll() is None for a in agents), "\n".join(a.tail() for a in agents)
            time.sleep(0.1)
        workers = lost.workers()
        assert len(workers) == 1, workers
        killed_at, killed_step = time.monotonic(), max(s for s, _ in losses(run))
        if victim in ("agent", "agent+worker"):
            os.kill(lost.proc.pid, signal.SIGKILL)
        if victim in ("worker", "agent+worker"):
            os.kill(workers[0], signal.SIGKILL)
        assert killed_step < STEPS, "the run finished before the kill (the pace is too fast)"
        # the resumed trainer's first new step: a record past the resumed step, after the kill
        resumed_at = None
        while resumed_at is None and time.monotonic() < killed_at + 120:
            out = agents[0].out
            if "resuming from" in out.split(f"step {killed_step}/", 1)[-1]:
                resumed_step = int(out.rsplit("resuming from", 1)[1].split(" at step ")[1].split()[0])
                if any(s > resumed_step for s, _ in losses(run)):
                    resumed_at = time.monotonic()
            time.sleep(0.05)
        codes = wait_all(agents, timeout=180)
    finally:
        for a in agents:
            a.kill()
    assert codes[0] == 0, f"the surviving agent exited {codes[0]}\n{agents[0].tail()}"
    assert resumed_at is not None, agents[0].tail()
    return run, agents, killed_at, resumed_at


def _assert_every_step_once(run: Path) -> None:
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1)), losses(run)


@pytest.mark.slow
@agents_test
@pytest.mark.parametrize("victim", ["agent+worker", "agent"])
def test_a_lost_node_shrinks_the_job_which_resumes_and_finishes(tmp_path, victim, one_process):
    run, agents, killed_at, resumed_at = _run_and_lose_one(tmp_path, victim)
    survivor = agents[0]
    print(f"\nelastic restart ({victim} killed, 2 -> 1 rank): {resumed_at - killed_at:.1f} s from the kill "
          "to the resumed run's first step")  # fmt: skip
    if victim == "agent+worker":  # the survivor's rank saw its peer vanish
        assert f"failed (exitcode: {PEER_LOST_EXIT})" in survivor.err, survivor.tail()
        assert "was lost" in survivor.err and "torchrun restarts the workers" in survivor.err, survivor.tail()
    else:  # the orphan made every rank checkpoint and exit 75: a failure to restart, not the job's end
        assert "(a torchrun agent died): checkpointed step" in survivor.out + agents[1].out, survivor.tail()
        assert f"failed (exitcode: {REQUEUE_EXIT})" in survivor.err, survivor.tail()
    worlds = checkpoint_worlds(run)
    assert worlds[STEPS] == 1 and any(w == 2 for w in worlds.values()), worlds
    assert "| world 1 |" in survivor.out.rsplit("resuming from", 1)[1], survivor.tail()
    assert "| torchrun restart 1 of 3" in survivor.out and "135712" not in survivor.err, survivor.tail()
    _assert_every_step_once(run)
    # 2 ranks, then 1: the same run up to float reassociation (the sums run in another order)
    ref = dict(losses(one_process))
    for step, loss in losses(run):
        assert loss == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
    ours, theirs = final_weights(run), final_weights(one_process)
    assert ours.keys() == theirs.keys()
    for name in ours:
        # measured: at most 7.6e-6 apart (Adam magnifies the reassociation of tiny gradients); one
        # step more or less moves weights by ~lr = 3e-3
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.slow
@agents_test
def test_a_lost_worker_restarts_both_agents_at_the_same_size_bit_for_bit(tmp_path, two_ranks):
    run, agents, killed_at, resumed_at = _run_and_lose_one(tmp_path, "worker")
    print(f"\nelastic restart (a worker killed, 2 ranks again): {resumed_at - killed_at:.1f} s from the kill "
          "to the resumed run's first step")  # fmt: skip
    assert set(checkpoint_worlds(run).values()) == {2}
    assert agents[1].proc.returncode == 0, agents[1].tail()
    _assert_every_step_once(run)
    assert losses(run) == losses(two_ranks)
    ours, theirs = final_weights(run), final_weights(two_ranks)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [s for s, _ in list_checkpoints(run)][-1] == STEPS
    assert not [r for r in read_metrics(run) if "final_val_loss" in r]  # final_val_sequences=0: none


def test_restarts_over_torchrun_s_shared_store_are_warned_about(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_warning()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts: nothing to read stale keys
    assert shared_store_warning() is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the variable gives
    assert shared_store_warning() is None


def test_a_restarted_worker_waits_for_the_previous_attempt_s_lock(tmp_path, monkeypatch):
    """The previous attempt's rank 0 may still hold the run directory's lock for a moment (an orphan
    finishing its checkpoint): a restarted worker waits for it; a first attempt fails at once."""
    held = acquire_lock(tmp_path / "run")
    threading.Timer(0.5, held.release).start()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(UserError, match="is in use by pid"):
        acquire_lock(tmp_path / "run", restart_lock_wait_s())
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_lock_wait_s() > 0
    lock = acquire_lock(tmp_path / "run", restart_lock_wait_s())
    assert lock.held and not held.held
    lock.release()


def test_launcher_death_and_the_pace_fault(monkeypatch):
    monkeypatch.setattr(process_group, "_LAUNCHER", None)  # not under torchrun: nothing watched
    assert not process_group.launcher_gone()
    monkeypatch.setattr(process_group, "_LAUNCHER", os.getppid())
    assert not process_group.launcher_gone()
    monkeypatch.setattr(process_group, "_LAUNCHER", os.getppid() + 1)  # re-parented: the agent died
    assert process_group.launcher_gone()
    for spec, pace in [("slow:0.25", 0.25), ("slow:0.5@1", 0.5), ("slow:x", 0.0), ("stall:3", 0.0)]:
        monkeypatch.setenv("LAUNCH_FAULT", spec)
        assert faults.slow_s() == pace, spec
