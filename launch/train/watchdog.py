"""A hung job ends with stacks and one line instead of sitting on its accelerators until the time limit.

`train.watchdog_s=S`: each rank runs a daemon thread that watches its own last step-progress time. A
rank blocked in a collective because a peer stopped is itself not progressing, so every rank that can
still run Python notices on its own, with no collective involved (those are what hangs). When S seconds
pass without progress the thread:

1. writes the Python stacks of all the rank's threads to RUN/stacks/rank_R.txt (faulthandler), under a
   header saying whether its main thread was waiting inside torch.distributed/autograd (a victim) or
   elsewhere (a suspect);
2. waits a few seconds for the other ranks' files, then the lowest rank that wrote one prints one
   line naming the stalled rank(s): those whose main thread was outside any collective, and those that
   wrote nothing (stopped, or stuck in C code holding the GIL);
3. exits WATCHDOG_EXIT with os._exit: a main thread blocked in a C++ collective cannot be interrupted
   any other way, and the interpreter's teardown would wait on it.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
from pathlib import Path

# Not 0 (success), 1 (a bug's traceback), 2 (bad input) or 3 (a lost peer): a hang is a failure of the
# machine or the network that a retry (scheduler requeue, torchrun --max-restarts) can get past.
WATCHDOG_EXIT = 4
STACKS_DIR = "stacks"
# Frames that mean "waiting on peers": collectives, DDP's buffer sync and the autograd engine, which
# runs DDP's and FSDP's gradient collectives from C++ under `backward()`.
_WAITING = tuple(
    os.sep + os.path.join("torch", part) + os.sep for part in ("distributed", "autograd", "nn/parallel")
)
_STATE_WAITING = "state: waiting in a collective"
_STATE_WORKING = "state: not in a collective"
# Set once this process's watchdog has fired: from then on it owns the exit (its line, its status). A
# collective failing meanwhile in the main thread because a peer's watchdog exited first is a consequence,
# not news (launch.distributed.process_group.run_torchrun_cli parks that thread instead of reporting it).
FIRED = threading.Event()


def collective_timeout_s(watchdog_s: float) -> float | None:
    """The process group's collective timeout for a watchdog setting (None: torch's 30-minute default).
    Never below the watchdog, so the watchdog, which leaves stacks, fires first; never below 60 s, so a
    short watchdog in a test does not make a slow checkpoint barrier fail."""
    return max(float(watchdog_s), 60.0) if watchdog_s > 0 else None


def _main_thread_waiting() -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in _WAITING):
            return True
        frame = frame.f_back
    return False


class Watchdog:
    """`beat(step)` after each unit of progress; `stop()` before work the watchdog should not time."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int = 0, world: int = 1, grace_s: float = 5.0):
        self.timeout_s, self.rank, self.world = float(timeout_s), rank, world
        self.dir = Path(run_dir) / STACKS_DIR
        # Long enough for every rank's thread to fire (they all stopped progressing within a step of
        # each other), short against any sensible timeout.
        self.grace_s = min(grace_s, self.timeout_s / 4)
        self.started = time.time()
        self._last, self._step = time.monotonic(), 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launch-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self._last, self._step = time.monotonic(), step  # two plain stores: no lock on the hot path

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        poll = min(5.0, max(0.2, self.timeout_s / 20))
        while not self._stopped.wait(poll):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s and not self._stopped.is_set():
                self._fire(idle)

    def _path(self, rank: int) -> Path:
        return self.dir / f"rank_{rank}.txt"

    def _fire(self, idle: float) -> None:
        FIRED.set()
        step = self._step + 1  # the step in progress: the last completed one plus one
        waiting = _main_thread_waiting()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self._path(self.rank), "w") as f:
                f.write(
                    f"watchdog: rank {self.rank} of {self.world}, pid {os.getpid()} on {socket.gethostname()}: "
                    f"no step progress for {idle:.0f} s at step {step}\n"
                    f"{_STATE_WAITING if waiting else _STATE_WORKING}\n\n"
                )
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:  # an unwritable run directory must not keep the job hanging
            print(
                f"warning: watchdog (rank {self.rank}): cannot write stacks: {e}", file=sys.stderr, flush=True
            )
        if self.world > 1:
            time.sleep(self.grace_s)  # the other ranks' threads write theirs
        written = self._written()
        if self.rank == min(written, default=self.rank):
            print(f"error: {self._report(step, idle, written)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(WATCHDOG_EXIT)

    def _written(self) -> dict[int, str]:
        """Rank -> state line of this incident's stack files (older files of an earlier job are ignored)."""
        found = {}
        for r in range(self.world):
            path = self._path(r)
            try:
                if path.stat().st_mtime < self.started - 30:
                    continue
                with open(path) as f:
                    f.readline()
                    found[r] = f.readline().strip()
            except OSError:
                continue
        return found

    def _report(self, step: int, idle: float, written: dict[int, str]) -> str:
        silent = [r for r in range(self.world) if r not in written]
        working = [r for r, state in written.items() if state == _STATE_WORKING]
        files = ", ".join(self._path(r).name for r in sorted(written)) or "none written"
        tail = (
            f"at step {step}; stacks: {self.dir}/ ({files}); exiting {WATCHDOG_EXIT}: re-run the same command "
            f"to resume from the last checkpoint"
        )
        if self.world > 1 and (silent or working) and len(silent) + len(working) < self.world:
            who = [f"rank {r} (not in a collective)" for r in working]
            who += [f"rank {r} (wrote no stacks: stopped, or stuck holding the GIL)" for r in silent]
            return f"watchdog: stalled: {', '.join(who)}; no step progress for {idle:.0f} s {tail}"
        return f"watchdog: no step progress on rank {self.rank} for {idle:.0f} s {tail}"
