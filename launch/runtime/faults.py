"""Fault injection for the failure-handling tests (kill -9, signals, a hung rank, NaN, a crash mid-checkpoint).

Set LAUNCH_FAULT=NAME:STEP (e.g. `kill:3`, `sigterm:4`, `sigusr1:4`, `stall:5`, `nan:2`,
`crash_in_save:6`), on every rank, or NAME:STEP@RANK on one rank only (`stall:5@1`: rank 1 hangs,
the others wait for it in the step's collectives). `slow:SECONDS` is no fault but a pace: every step
starts SECONDS late (`slow:0.1`), so a test can act on a run mid-way. The trainer installs
`FaultInjection` as a step hook only when it is set (`step_hooks`), so normal runs carry nothing of
it; the checkpoint writer asks `fault("crash_in_save", step)` itself, and launch.eval's scoring calls
`fault_point(batch)`.
"""

from __future__ import annotations

import os
import signal
import time


def fault(name: str, step: int) -> bool:
    spec = os.environ.get("LAUNCH_FAULT")
    if not spec:
        return False
    spec, _, rank = spec.partition("@")
    return spec == f"{name}:{step}" and (not rank or rank == os.environ.get("RANK", "0"))


def slow_s() -> float:
    """The pause before every step that LAUNCH_FAULT=slow:SECONDS asks for (0 otherwise)."""
    name, _, value = os.environ.get("LAUNCH_FAULT", "").partition(":")
    if name != "slow":
        return 0.0
    try:
        return max(0.0, float(value.partition("@")[0]))
    except ValueError:
        return 0.0


class FaultInjection:
    """A trainer step hook (`launch.train.hooks`) that injects the LAUNCH_FAULT named for a step."""

    def before_step(self, step: int) -> None:
        """At the start of optimizer step `step`: `kill` (SIGKILL), `sigterm`, `sigusr1`, or `stall`
        (sleep for good in Python: the watchdog's case of a rank that stops making progress); before
        every step, the pause of `slow:SECONDS`."""
        if fault("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if fault("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if fault("sigusr1", step):
            os.kill(os.getpid(), signal.SIGUSR1)
        while fault("stall", step):
            time.sleep(3600)
        if (pace := slow_s()) > 0:
            time.sleep(pace)

    def after_loss(self, loss, step: int):
        """On the step's reduced loss: `nan` poisons it."""
        return loss * float("nan") if fault("nan", step) else loss


def fault_point(step: int) -> None:
    """A fault point outside the trainer's loop, counted in its own units (launch.eval: the scoring
    batches): the LAUNCH_FAULT kill/sigterm/stall named for `step`. Nothing when LAUNCH_FAULT is unset."""
    if os.environ.get("LAUNCH_FAULT"):
        FaultInjection().before_step(step)


def step_hooks() -> list[FaultInjection]:
    """The hooks to install in the trainer: fault injection when LAUNCH_FAULT is set, else none."""
    return [FaultInjection()] if os.environ.get("LAUNCH_FAULT") else []
