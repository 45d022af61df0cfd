"""Temporary directories of processes that died: found by the pid in their name, removed by the next
process that writes the same place. SIGKILL runs no cleanup, so this is the only way a crash leaves no
debris; a live process's temporaries (another job on the same directory) are left alone."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_dead_temps(directory: Path, pattern: re.Pattern) -> list[Path]:
    """Remove the directories in `directory` whose name matches `pattern` (its group `pid` names the
    process that made it) and whose process no longer exists. Returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        m = pattern.fullmatch(path.name)
        if m and path.is_dir() and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
