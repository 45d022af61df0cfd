"""User-facing errors: one line that names the culprit, no traceback wall."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, mismatched checkpoint).

    Entry points print it as a single line and exit with status 2; anything else is a bug and
    keeps its traceback."""


class ConfigError(UserError):
    pass


class TrainingError(UserError):
    """The run cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


# The machine, not the code: a full disk or quota, a read-only or forbidden path, `ulimit -f`.
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _fail(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    prefix = "error" if rank == "0" else f"error (rank {rank})"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


class CliExit(Exception):
    """Stop an entry point early with `text` on stdout (status 0: --help, print_config) or on
    stderr (status 2: a usage error that is best shown with the usage text)."""

    def __init__(self, text: str, code: int = 0):
        super().__init__(text)
        self.text, self.code = text, code


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except CliExit as e:
        if os.environ.get("RANK", "0") == "0":
            print(
                e.text,
                end="" if e.text.endswith("\n") else "\n",
                file=sys.stdout if e.code == 0 else sys.stderr,
                flush=True,
            )
        sys.exit(e.code)
    except UserError as e:
        _fail(str(e))
        if os.environ.get("LAUNCH_TRACEBACK"):
            raise
        sys.exit(getattr(e, "exit_code", 2))  # 2, or 143 for a SIGTERM turned into a clean stop
    except OSError as e:
        if e.errno not in RESOURCE_ERRNOS or os.environ.get("LAUNCH_TRACEBACK"):
            raise
        where = f": {e.filename}" if e.filename else ""
        _fail(f"{e.strerror}{where} (free space or fix the permissions, then re-run)")
        sys.exit(2)
    sys.exit(code or 0)
