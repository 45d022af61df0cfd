"""Fault injection for the failure-handling tests (kill -9, SIGTERM, NaN, a crash mid-checkpoint).

Set LAUNCH_FAULT=NAME:STEP (e.g. `kill:3`, `sigterm:4`, `nan:2`, `crash_in_save:6`). Unset in
normal runs, where every check is a dictionary lookup.
"""

from __future__ import annotations

import os


def fault(name: str, step: int) -> bool:
    spec = os.environ.get("LAUNCH_FAULT")
    return bool(spec) and spec == f"{name}:{step}"
