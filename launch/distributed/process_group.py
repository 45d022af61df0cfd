"""Process-group setup and small collectives, gloo on CPU and NCCL on GPU. The parallel layout
(mesh, tensor/memory/data parallel) is `launch.parallelize`."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launch.distributed import roll_call
from launch.runtime.errors import UserError, peer_gone


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(requested: str, local_rank: int, key: str = "train.device") -> torch.device:
    """`key` is how the calling command spells the setting (`train.device` for launch.train, `device`
    for launch.eval), so the error names a key the user can actually pass."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{key}=cuda but CUDA is not available (use {key}=cpu or {key}=auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    device: str = "auto",
    backend: str = "auto",
    device_key: str = "train.device",
    timeout_s: float | None = None,
) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process).
    `device_key` names the device setting in errors (see `pick_device`). `timeout_s`: how long a
    collective may wait for its peers (None: 30 minutes; the trainer derives it from train.watchdog_s)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank, device_key)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        join_process_group(backend, rank, world, timeout_s or 1800)
        roll_call.start(rank, world)  # so that a survivor of a lost rank can name it (beyond two ranks)
    if rank == 0 and (warning := shared_store_warning()):
        print(warning, file=sys.stderr, flush=True)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


JOIN_REPORT_S = 30.0  # a rank still waiting for its peers says so after this long, then every minute


def join_process_group(backend: str, rank: int, world: int, timeout_s: float) -> None:
    """`dist.init_process_group` from torchrun's (or a hand-set) environment, saying so while it waits:
    a rank that was never started, or died starting, leaves the others waiting in silence until the
    timeout, which is then one line instead of a DistStoreError traceback."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    joined = threading.Event()

    def report() -> None:
        pause, waited = JOIN_REPORT_S, JOIN_REPORT_S
        while not joined.wait(pause):
            print(
                f"rank {rank}: still waiting for the other ranks to join the process group at {where} "
                f"(WORLD_SIZE={world}, {waited:.0f} s so far; it gives up after {timeout_s:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            pause = 60.0
            waited += pause

    threading.Thread(target=report, name="launch-join", daemon=True).start()
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # torch's DistStoreError / DistNetworkError on a timeout
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"the process group of WORLD_SIZE={world} ranks at {where} did not form within "
            f"{timeout_s:.0f} s ({first}): start every rank 0..{world - 1} with the same MASTER_ADDR and "
            "MASTER_PORT, or let `python -m launch.torchrun` start them"
        ) from e
    finally:
        joined.set()


def shared_store_warning() -> str | None:
    """A line for rank 0 when torchrun may restart workers (--max-restarts) over its shared TCPStore.

    torchrun's c10d rendezvous hands the workers one TCPStore for the life of the agent (torch >= 2.4,
    TORCHELASTIC_USE_AGENT_STORE=True), and the keys of one attempt outlive it: a restarted worker may
    read its peers' addresses from the attempt before. Measured on torch 2.13 (gloo, two agents on one
    machine, one worker SIGKILLed, 9 tries): 2 restarted jobs hung for good, 4 needed 1 to 3 more
    restarts ("Connection refused" when connecting), 3 were clean; with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (rank 0 then hosts a fresh store each attempt) 7 of 7 restarted
    once and finished (torch issue 135712)."""
    restarts = _torchrun_restarts()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restarts <= 0:
        return None
    return (
        f"warning: torchrun --max-restarts={restarts} shares its rendezvous TCPStore with the workers, and "
        "a restarted worker can then read its peers' old addresses and fail to connect or hang (torch issue "
        "135712): start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/parallelism.md)"
    )


def destroy(barrier: bool = True) -> None:
    """Leave the process group. `barrier=False` on the way out of an error: a peer may be gone, and
    a barrier would then fail again (burying the first error) or wait for it."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


PEER_LOST_EXIT = 3  # not 2 (bad input) and not 1 (a bug): the run is intact, re-run to resume it


def lost_peer_message(rank: int, world: int, missing: list[int] | None) -> str:
    """One line for a survivor of a lost rank. `missing`: the ranks that did not answer the roll call
    (launch.distributed.roll_call; None when none was held). With two ranks the lost one is the other;
    beyond that, the roll call names it."""
    gone = "its process died or its node went away"
    if world == 2:
        who = f"rank {1 - rank} was lost ({gone})"
    elif missing:
        names = ", ".join(str(r) for r in missing)
        plural = len(missing) > 1
        who = f"rank{'s' if plural else ''} {names} {'were' if plural else 'was'} lost ({gone}: no answer to a roll call)"
    elif missing is None:  # no roll call was started
        who = f"a peer rank was lost ({gone})"
    else:  # every peer answered: one closed its connection, yet every process still runs
        who = "a peer rank dropped its connection (every rank still answers a roll call)"
    then = (
        "torchrun restarts the workers while it has restarts left (--max-restarts), resuming"
        if _torchrun_restarts() > 0
        else "Re-run the same command to resume"
    )
    return (
        f"rank {rank}: {who} during a collective; "
        f"this rank stops too. {then} from the last checkpoint "
        f"(look for the first failure in the lost rank's log)"
    )


def _torchrun_restarts() -> int:
    """torchrun's --max-restarts for this worker (0 when not under torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return 0


def run_torchrun_cli(main) -> None:
    """`launch.errors.run_cli(main)`, then, under torchrun (after the process group is destroyed and
    every file closed), exit without the interpreter's teardown: torch's C++ background threads have
    been seen to abort a finished run there ("terminate called without an active exception", -6)."""
    from launch.runtime.errors import run_cli

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        watch_parent()
    try:
        run_cli(main)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if world > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise
    except Exception as e:
        if _watchdog_exiting():
            threading.Event().wait()  # the watchdog thread prints its line and ends the process
        # A dead peer surfaces in whichever collective came next, as a gloo/NCCL traceback on
        # every survivor: say it in one line instead (LAUNCH_TRACEBACK=1 keeps the traceback).
        if world <= 1 or not peer_gone(e) or os.environ.get("LAUNCH_TRACEBACK"):
            raise
        # torchrun stops the other workers once it sees one fail: this rank is leaving anyway, and
        # its line (the roll call takes milliseconds) should not be cut off by that SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        missing = roll_call.missing_ranks()  # None below three ranks: none was held
        print(
            f"error: {lost_peer_message(int(os.environ.get('RANK', '0')), world, missing)}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(PEER_LOST_EXIT)  # no teardown: torch's threads may still wait on the dead peer


def _watchdog_exiting() -> bool:
    """Whether the trainer's watchdog (launch.train.watchdog) has fired in this process: looked up in
    sys.modules, as only the trainer imports it."""
    watchdog = sys.modules.get("launch.train.watchdog")
    return watchdog is not None and watchdog.FIRED.is_set()


def watch_parent() -> None:
    """Under torchrun: a SIGTERM when the launcher dies, even by SIGKILL (Linux PR_SET_PDEATHSIG).

    Without it a `kill -9` of torchrun leaves its workers training as orphans, holding the run
    directory's lock and the accelerators. The SIGTERM goes through the trainer's pre-emption path:
    every rank receives it, so they checkpoint at the same step boundary and exit REQUEUE_EXIT, since
    the run is not finished (`launcher_gone`; before training starts the default action applies: they
    exit at once). Not set for a plain `python -m` process,
    whose parent (a shell, srun) dying is not a reason to stop."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    global _LAUNCHER
    parent = os.getppid()
    # launch.torchrun names itself: a launcher that died before this line ran is told from the parent
    # this process has now (a sub-reaper, not always pid 1).
    expected = os.environ.get("LAUNCH_AGENT_PID", "")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return  # no prctl (an unusual libc): nothing to watch with, the old behaviour stays
    _LAUNCHER = parent
    if os.getppid() != parent or parent == 1 or (expected.isdigit() and int(expected) != parent):
        # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_LAUNCHER: int | None = None  # the torchrun agent watch_parent watches (None: not watching)


def launcher_gone() -> bool:
    """Whether the torchrun agent that started this worker has died (this process was re-parented).

    Its death is not a request to stop the job: under `torchrun --max-restarts` the agents that are
    left restart their workers, which resume from the checkpoint this worker's SIGTERM leads to. So
    the trainer exits REQUEUE_EXIT ("not finished, run me again"), never 0, which the other agents
    would take for the job's success (launch.train.trainer)."""
    return _LAUNCHER is not None and os.getppid() != _LAUNCHER


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks, on every rank."""
    return all_reduce_max_each([value], device)[0]


def all_reduce_max_each(values: list[int], device: torch.device) -> list[int]:
    """The largest of each of `values` over all ranks, on every rank (one collective)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (keeps collective decisions in lockstep)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)
