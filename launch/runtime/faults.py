"""Fault injection for the failure-handling tests (kill -9, SIGTERM, NaN, a crash mid-checkpoint).

Set LAUNCH_FAULT=NAME:STEP (e.g. `kill:3`, `sigterm:4`, `nan:2`, `crash_in_save:6`). Unset in
normal runs, where every check is a dictionary lookup.
"""

from __future__ import annotations

import os


def fault(name: str, step: int) -> bool:
    spec = os.environ.get("LAUNCH_FAULT")
    return bool(spec) and spec == f"{name}:{step}"


def before_step(step: int) -> None:
    """The trainer's hook at the start of optimizer step `step`: `kill` (SIGKILL) or `sigterm`."""
    import signal

    if fault("kill", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if fault("sigterm", step):
        os.kill(os.getpid(), signal.SIGTERM)


def after_loss(loss, step: int):
    """The trainer's hook on the step's reduced loss: `nan` poisons it."""
    return loss * float("nan") if fault("nan", step) else loss
