"""User-facing errors: one line that names the culprit, no traceback wall."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, mismatched checkpoint).

    Entry points print it as a single line and exit with status 2; anything else is a bug and
    keeps its traceback."""


class ConfigError(UserError):
    pass


class AgreedError(UserError):
    """The same error on every rank, agreed in a collective (a checkpoint write that failed on any
    rank): rank 0 prints it, the others exit with the same status quietly."""


class TrainingError(UserError):
    """The run cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


# The machine, not the code: a full disk or quota, a read-only or forbidden path, `ulimit -f`.
# tempfile.gettempdir()'s FileNotFoundError when it can write in none of TMPDIR, /tmp, /var/tmp, ...
_NO_TEMP_DIR = "No usable temporary directory found"
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def causes(e: BaseException):
    """`e`, then what is behind it: torch.distributed.checkpoint's CheckpointException (a BaseException
    collecting every rank's failure, each wrapped) and the cause/context chain, depth first."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = []
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                # DCP wraps each rank's failure as (exception, traceback summary); older versions as an object.
                x = f[0] if isinstance(f, tuple) and f else getattr(f, "exception", f)
                if isinstance(x, BaseException):
                    inner.append(x)
        inner.append(e.__cause__ or e.__context__)
        todo.extend(reversed(inner))


def root_cause(e: BaseException) -> BaseException:
    """The first OSError behind `e` (see `causes`), else `e`."""
    return next((c for c in causes(e) if isinstance(c, OSError)), e)


# What gloo and NCCL say when the process at the other end of a collective is gone (killed, OOM,
# its node lost). Matched on the message: torch raises a plain RuntimeError for most of them.
_PEER_GONE = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "remote process exited",
    "ncclremoteerror",
    "socket timeout",
)


def peer_gone(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a collective failing because the rank at the other end
    is gone (also inside DCP's CheckpointException, which collects every rank's failure)."""
    return any(
        isinstance(c, RuntimeError) and any(m in str(c).lower() for m in _PEER_GONE) for c in causes(exc)
    )


def no_temp_dir_message(e: OSError) -> str:
    return (
        f"{e.strerror or e}: a full disk, a read-only filesystem or `ulimit -f 0`; free space or point "
        "TMPDIR at a writable directory, then re-run"
    )


def describe_os_error(e: OSError) -> str:
    """'PATH: No space left on device (ENOSPC)': the file and the errno, by name."""
    name = errno.errorcode.get(e.errno or 0, "")
    reason = f"{e.strerror or e}" + (f" ({name})" if name else "")
    return f"{e.filename}: {reason}" if e.filename else reason


def ignore_file_size_signal() -> None:
    """Under `ulimit -f` a write past the limit then fails with EFBIG (one line, temporaries removed)
    instead of the process dying from SIGXFSZ with its temp directories left behind. Main thread only."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def quiet_interrupt_during_start_up() -> None:
    """Ctrl-C (or torchrun passing it on) while a command imports torch ends it quietly with the
    shell's status (SIG_DFL), not a KeyboardInterrupt traceback from inside an import. Left alone
    where SIGINT is ignored (a background job). Main thread only."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is (
        signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_after_start_up() -> None:
    """Undo `quiet_interrupt_during_start_up` once the command runs: Ctrl-C is a KeyboardInterrupt
    again, which the command turns into one line."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _is_checkpoint_exception(e: BaseException) -> bool:
    return type(e).__name__ == "CheckpointException"  # torch's, without importing torch here


def _fail(message: str, every_rank_says_it: bool = False) -> None:
    """The one line. `every_rank_says_it`: the same error on every rank (agreed in a collective, or a
    bad command line, which every rank parses alike): only rank 0 prints it. One write, so the lines of
    several ranks sharing a terminal do not run together."""
    rank = os.environ.get("RANK", "0")
    if every_rank_says_it and rank != "0":
        return
    prefix = "error" if rank == "0" else f"error (rank {rank})"
    sys.stderr.write(f"{prefix}: {message}\n")
    sys.stderr.flush()


INTERRUPTED_EXIT = 130  # the shell's status for a process ended by SIGINT


class CliExit(Exception):
    """Stop an entry point early with `text` on stdout (status 0: --help, print_config) or on
    stderr (status 2: a usage error that is best shown with the usage text)."""

    def __init__(self, text: str, code: int = 0):
        super().__init__(text)
        self.text, self.code = text, code


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ignore_file_size_signal()  # every command: a write past `ulimit -f` is an error, not a kill
    interrupt_after_start_up()
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
    except KeyboardInterrupt:
        # Ctrl-C (or torchrun passing on its SIGINT): the user's own stop, not a bug. Atomic writes
        # leave nothing half-written; a training run resumes from its last checkpoint.
        if os.environ.get("LAUNCH_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(
                "interrupted (SIGINT): stopped; a training run resumes from its last checkpoint when re-run "
                "(to save one first, send SIGTERM or add SIGINT to train.checkpoint_signals)",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(INTERRUPTED_EXIT)
    except UserError as e:
        _fail(str(e), every_rank_says_it=isinstance(e, ConfigError | AgreedError))
        if os.environ.get("LAUNCH_TRACEBACK"):
            raise
        sys.exit(getattr(e, "exit_code", 2))  # 2, or 143 for a SIGTERM turned into a clean stop
    except BaseException as e:  # noqa: BLE001 (filtered to resource errors below; the rest re-raised)
        if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        # torch's CheckpointException wraps the per-rank OSError (a full disk while DCP writes a shard).
        cause = root_cause(e) if isinstance(e, OSError) or _is_checkpoint_exception(e) else e
        if os.environ.get("LAUNCH_TRACEBACK") or not isinstance(cause, OSError):
            raise
        if cause.errno in RESOURCE_ERRNOS:
            _fail(f"{describe_os_error(cause)} (free space or fix the permissions, then re-run)")
        elif _NO_TEMP_DIR in str(cause):  # tempfile could write in none of its candidates
            _fail(no_temp_dir_message(cause))
        else:
            raise
        sys.exit(2)
    sys.exit(code or 0)
