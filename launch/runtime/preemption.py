"""Checkpoint signals as requests, not deaths (`train.checkpoint_signals`, default SIGTERM and SIGUSR1).

The trainer answers one by checkpointing at the next step boundary, every rank at the same step, then:

- SIGTERM or SIGINT (SLURM pre-emption, scancel, a user stopping the run): exit 0. The job was asked to
  stop; a pre-empted job is requeued by SLURM itself, a cancelled one must not come back.
- any other signal, typically SIGUSR1 (SLURM's warning before the time limit, `--signal=USR1@120`): exit
  REQUEUE_EXIT, "stopped early, run me again", and with `train.requeue=true` under SLURM rank 0 runs
  `scontrol requeue $SLURM_JOB_ID` once the checkpoint is committed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

# EX_TEMPFAIL (sysexits.h): a temporary failure, the invocation is to be retried. Distinct from 0
# (finished or stopped on purpose), 2 (bad input), 3 (a lost peer) and 4 (the watchdog).
REQUEUE_EXIT = 75
_STOP_ONLY = (signal.SIGTERM, signal.SIGINT)
# Agreed across ranks as the max of each rank's code: a requeue request outranks a plain stop, so one
# rank's SIGUSR1 still requeues when another rank saw SIGTERM at the same boundary.
_REQUEUE_RANK = 1000


def parse_signal(name: str) -> signal.Signals:
    """'SIGUSR1', 'USR1' or 'usr1' -> signal.SIGUSR1; ValueError for anything that cannot be caught."""
    text = str(name).strip().upper()
    text = text if text.startswith("SIG") else "SIG" + text
    sig = getattr(signal.Signals, text, None) if text in signal.Signals.__members__ else None
    if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{name!r} is not a signal that can be caught (e.g. SIGTERM, SIGUSR1)")
    return sig


def requests_requeue(sig: int) -> bool:
    return sig not in _STOP_ONLY


def encode(sig: int | None) -> int:
    """A rank's vote for the agreement (0: no signal)."""
    if sig is None:
        return 0
    return int(sig) + (_REQUEUE_RANK if requests_requeue(sig) else 0)


def decode(code: int) -> signal.Signals | None:
    return signal.Signals(code % _REQUEUE_RANK) if code else None


class Preemption:
    """Remembers the checkpoint signal received (`signal`) until `restore` puts the previous handlers back."""

    def __init__(self, names=("SIGTERM",)):
        self.signal: signal.Signals | None = None
        self._previous = {}
        for sig in dict.fromkeys(parse_signal(n) for n in names):
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def code(self) -> int:
        return encode(self.signal)

    def _handle(self, signum, frame):
        if self.signal is None or encode(signum) > encode(self.signal):
            self.signal = signal.Signals(signum)

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def requeue_slurm_job() -> None:
    """`scontrol requeue $SLURM_JOB_ID` (call once the checkpoint is committed: SLURM ends the running
    job as it requeues it). A failure is a warning: the exit status still says 'requeue me'."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("warning: train.requeue=true but SLURM_JOB_ID is not set (not under SLURM): not requeuing",
              file=sys.stderr, flush=True)  # fmt: skip
        return
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        print(
            "warning: train.requeue=true but scontrol is not on PATH: not requeuing",
            file=sys.stderr,
            flush=True,
        )
        return
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"warning: scontrol requeue {job} failed: {e}", file=sys.stderr, flush=True)
        return
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        print(f"warning: scontrol requeue {job} failed: {reason[0]}", file=sys.stderr, flush=True)
    else:
        print(f"requeued SLURM job {job} (scontrol requeue)", flush=True)
