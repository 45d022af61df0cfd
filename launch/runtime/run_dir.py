"""The run directory's guards: one writer at a time, a tokenizer of its own, no silent step rollback.

- `lock_run_dir` takes an exclusive `fcntl.flock` on RUN/run.lock for the life of the job (rank 0;
  the other ranks learn the outcome through one collective). A second trainer on the same directory
  fails with one line naming the directory and the holder's pid and host. The kernel drops a flock
  when its process dies, so a job killed with SIGKILL never blocks its requeue. A worker restarted by
  `torchrun --max-restarts` waits for the lock a while (its previous attempt may still be exiting).
- `install_tokenizer` keeps the run's tokenizer at RUN/tokenizer.model. Checkpoints copy it from
  there, so a resumed run never reads a file inside a checkpoint that pruning may delete.
- `check_resume_steps` refuses a `train.steps` below the step being resumed, before anything in
  the run directory is rewritten.
- `write_run_file` writes RUN/config.yaml atomically, failing in one line naming the file.
- `clear_debris`: the lock holder removes what killed writers left behind (half-written checkpoint
  temp directories, temp files of atomic writes): only the holder may, since nobody else can be
  writing them, and every requeue does, so repeated crashes never accumulate them. Checkpoints kept
  elsewhere (`train.checkpoint_dir`, a URL) are cleared the same way by the trainer's Checkpointer.
- run.dir itself must be new, empty or a run directory (launch.runtime.outputs.check_run_dir),
  checked before the lock file is created.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from launch.runtime.errors import AgreedError, UserError
from launch.runtime.outputs import check_run_dir

LOCK_FILE = "run.lock"
TOKENIZER_FILE = "tokenizer.model"
# flock on a filesystem without lock support (some NFS mounts without lockd, Lustre mounted with
# `noflock`) fails with one of these: the run goes on unlocked, with a warning.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirLock:
    """An exclusive flock on RUN/run.lock, held until `release()` or the process exits."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self._fd = run_dir, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def make_run_dir(run_dir: str | Path, key: str = "run.dir") -> Path:
    """Create `run_dir` (and parents), failing in one line if it is a file or cannot be created."""
    path = Path(run_dir)
    try:
        for p in (path, *path.parents):
            if p.exists() and not p.is_dir():
                raise UserError(f"{key}={run_dir}: {p} is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{key}={run_dir}: cannot create or enter the directory ({e.strerror})") from None
    return path


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process (it did not record its pid)"


def _flock(fd: int, lock_path: Path, wait_s: float) -> None:
    """Take the exclusive flock, trying for up to `wait_s` seconds (BlockingIOError if still held)."""
    end, said = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= end:
                raise
            if not said:
                print(
                    f"waiting up to {wait_s:.0f} s for {lock_path}, held by {_holder(lock_path)} "
                    "(the previous attempt of this torchrun job, still exiting?)",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            time.sleep(0.5)


def restart_lock_wait_s() -> float:
    """How long a worker waits for the run directory's lock: 0, except in a worker that torchrun
    restarted (TORCHELASTIC_RESTART_COUNT > 0), whose previous attempt's rank 0 may still be
    finishing its last checkpoint (an orphan whose agent was killed) or exiting."""
    try:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        restarts = 0
    return RESTART_LOCK_WAIT_S if restarts > 0 else 0.0


# Below the shortest collective timeout (60 s, launch.train.watchdog.collective_timeout_s): the other ranks
# wait for rank 0's lock in a collective meanwhile.
RESTART_LOCK_WAIT_S = 45.0


def acquire_lock(run_dir: str | Path, wait_s: float = 0.0) -> RunDirLock:
    """Take RUN/run.lock (trying for up to `wait_s` seconds) or fail naming its holder (single
    process; see `lock_run_dir`); then clear the debris of earlier, dead writers."""
    check_run_dir(run_dir)
    path = make_run_dir(run_dir)
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(
            f"run.dir={run_dir}: cannot create the lock file {lock_path} ({e.strerror})"
        ) from None
    try:
        _flock(fd, lock_path, wait_s)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"run.dir={run_dir} is in use by {_holder(lock_path)}: one run directory takes one trainer at a "
            "time (wait for it to end, or choose another run.dir)"
        ) from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            os.close(fd)
            raise UserError(f"run.dir={run_dir}: cannot lock {lock_path} ({e.strerror})") from None
        os.close(fd)
        print(
            f"warning: run.dir={run_dir}: this filesystem does not support file locks ({e.strerror}); "
            "running unlocked, so make sure no other job uses this directory",
            file=sys.stderr,
            flush=True,
        )
        return RunDirLock(path, None)
    # Holder details for the error a second job prints; the lock itself is the flock, not this text.
    os.ftruncate(fd, 0)
    os.write(
        fd,
        f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(),
    )
    clear_debris(path)
    return RunDirLock(path, fd)


# Temporary names the run's writers use (launch.checkpoint.checkpointer / atomic, write_run_file,
# install_tokenizer, MetricsLogger): anything matching them in a locked run dir is a dead writer's.
DEBRIS = ("checkpoints/.tmp_step_*", "checkpoints/.old_step_*", ".*.tmp[0-9]*", "metrics.jsonl.tmp")


def clear_debris(run_dir: Path) -> list[Path]:
    """Remove dead writers' temporaries from a run directory this process has just locked."""
    removed = []
    for pattern in DEBRIS:
        for p in run_dir.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def lock_run_dir(run_dir: str | Path, info) -> RunDirLock:
    """Rank 0 takes the run-directory lock; every rank fails together if it could not.

    Only rank 0 locks: flocks taken by several processes conflict with each other even on one node,
    and one job has exactly one rank 0. Call after the process group is up, before anything is
    written into the run directory."""
    lock, failure = RunDirLock(Path(run_dir), None), None
    if info.is_main:
        try:
            lock = acquire_lock(run_dir, restart_lock_wait_s())
        except UserError as e:
            failure = e
    if info.enabled:
        from launch.distributed.process_group import any_rank

        if any_rank(failure is not None, info.device) and failure is None:
            lock.release()
            # rank 0 says why in its own line; this one only stops, with the same status
            raise AgreedError(f"run.dir={run_dir}: rank 0 could not take the run directory (see its error)")
    if failure is not None:
        raise failure
    return lock


def install_tokenizer(source: Path, run_dir: str | Path) -> Path:
    """Copy `source` to RUN/tokenizer.model (atomically; skipped when identical) and return that path."""
    dest = Path(run_dir) / TOKENIZER_FILE
    if source.resolve() == dest.resolve():
        return dest
    if dest.is_file() and dest.read_bytes() == source.read_bytes():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{TOKENIZER_FILE}.tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return dest


def check_resume_steps(steps: int, resumed_step: int, resumed_from: Path | None) -> None:
    """A resumed run asked to stop before the step it resumes at: refuse, leaving the run untouched."""
    if resumed_from is not None and steps < resumed_step:
        raise UserError(
            f"train.steps={steps} is below step {resumed_step} of the checkpoint being resumed ({resumed_from}): "
            f"nothing to train; pass train.steps >= {resumed_step} (the run directory and its config.yaml are "
            "left unchanged)"
        )


def write_run_file(run_dir: str | Path, name: str, text: str) -> Path:
    """Write RUN/name atomically (temp file, then rename): a full disk or a read-only directory
    fails in one line naming the file and leaves the previous version whole."""
    path = Path(run_dir) / name
    tmp = path.with_name(f".{name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {path}: {e.strerror} (the previous {name}, if any, is unchanged)"
        ) from None
    return path
