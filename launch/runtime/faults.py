"""Fault injection for the failure-handling tests (kill -9, SIGTERM, NaN, a crash mid-checkpoint).

Set LAUNCH_FAULT=NAME:STEP (e.g. `kill:3`, `sigterm:4`, `nan:2`, `crash_in_save:6`). The trainer
installs `FaultInjection` as a step hook only when it is set (`step_hooks`), so normal runs carry
nothing of it; the checkpoint writer asks `fault("crash_in_save", step)` itself.
"""

from __future__ import annotations

import os
import signal


def fault(name: str, step: int) -> bool:
    spec = os.environ.get("LAUNCH_FAULT")
    return bool(spec) and spec == f"{name}:{step}"


class FaultInjection:
    """A trainer step hook (`launch.train.hooks`) that injects the LAUNCH_FAULT named for a step."""

    def before_step(self, step: int) -> None:
        """At the start of optimizer step `step`: `kill` (SIGKILL) or `sigterm`."""
        if fault("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if fault("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)

    def after_loss(self, loss, step: int):
        """On the step's reduced loss: `nan` poisons it."""
        return loss * float("nan") if fault("nan", step) else loss


def step_hooks() -> list[FaultInjection]:
    """The hooks to install in the trainer: fault injection when LAUNCH_FAULT is set, else none."""
    return [FaultInjection()] if os.environ.get("LAUNCH_FAULT") else []
