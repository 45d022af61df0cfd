"""`python -m launch.torchrun [torchrun's options] -m launch.train ...`: torchrun, with the three things a
training job needs from its launcher and plain torchrun does not do. Same options, same workers.

1. **SIGTERM** (scancel, a pre-emption, `kill`) goes to the workers, which checkpoint at the next step
   and exit; then this process ends with their status and one line. Plain torchrun turns SIGTERM into
   its own `SignalException` traceback, exit 1, and SIGKILLs workers still saving after 30 s
   (`--shutdown_timeout`). SIGINT, SIGHUP and SIGQUIT keep torchrun's forwarding, ended by one line.
2. **A failed worker** is one line naming the rank that failed first and how, and this process exits
   with that rank's status: 2 bad input, 3 a lost peer, 4 the watchdog, 75 "requeue me", 128+N a
   signal. Plain torchrun exits 1 for all of them, after a `ChildFailedError` traceback.
3. **`--max-restarts` > 0** sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless it is set: with torchrun's
   shared store a restarted worker can read its peers' old addresses and hang (torch issue 135712;
   launch.distributed.process_group.shared_store_warning has the measurements).

LAUNCH_TRACEBACK=1 keeps torch's tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from launch.runtime.errors import interrupt_after_start_up

# Not torch's: a failed rendezvous (no peers came, a wrong endpoint) is the machine's or the command
# line's problem, said in one line; 1 is what torchrun exits with too.
RENDEZVOUS_EXIT = 1


def exit_status(code: int) -> int:
    """A worker's exit code as a shell status: a death by signal N (negative code) is 128 + N."""
    return 128 - code if code < 0 else code


def describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"


def failure_line(failures: dict) -> tuple[str, int]:
    """One line for torchrun's ChildFailedError failures ({global rank: ProcessFailure}) and the status
    to exit with: the cause's. torchrun stamps failures it sees in one pass with the same second, so
    the cause is told by its status: a rank that stopped because a peer was lost (exit 3) or that
    torchrun itself stopped (SIGTERM) is a consequence; the earliest other failure is the cause."""

    from launch.distributed.process_group import PEER_LOST_EXIT

    def consequence(rank: int) -> bool:
        return failures[rank].exitcode in (PEER_LOST_EXIT, -signal.SIGTERM)

    cause = min(failures, key=lambda r: (consequence(r), failures[r].timestamp, r))
    first = failures[cause]
    line = f"launch.torchrun: rank {cause} {describe_status(first.exitcode)} (pid {first.pid})"
    after: dict[str, list[int]] = {}
    for r in sorted(failures):
        if r != cause:
            after.setdefault(describe_status(failures[r].exitcode), []).append(r)
    for status, ranks in after.items():
        line += f"; rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} {status}"
    line += "; the workers' own lines above say why"
    return line, exit_status(first.exitcode)


class _Terminate:
    """SIGTERM handler: pass it to the workers (torchrun's direct children) and let them finish their
    checkpoint, with no deadline. Before any worker exists there is nothing to save: end at once."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum, frame) -> None:
        from launch.runtime.processes import child_pids

        self.received = True
        workers = child_pids(os.getpid())
        if not workers:
            raise SystemExit(exit_status(-signum))
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


AGENT_PID_ENV = "LAUNCH_AGENT_PID"  # read by the workers (launch.distributed.process_group.watch_parent)


def main(argv: list[str]) -> int:
    # First, before torch is imported (seconds): a signal in that time ends this process in one line.
    terminate = _Terminate()
    signal.signal(signal.SIGTERM, terminate)
    interrupt_after_start_up()  # a SIGINT from here on is this function's one line
    # The workers compare their parent with this: one started just as this process died (a SIGTERM
    # during their start) finds itself re-parented and stops, rather than train as an orphan.
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    keep_traceback = bool(os.environ.get("LAUNCH_TRACEBACK"))
    try:
        import torch.distributed.run as torchrun
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.elastic.rendezvous.api import RendezvousError

        args = torchrun.parse_args(argv)
        if args.max_restarts > 0:
            os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        # torchrun keeps the other signals (it forwards them and raises); SIGTERM is ours.
        handled = [
            s.strip() for s in args.signals_to_handle.split(",") if s.strip() and s.strip() != "SIGTERM"
        ]
        args.signals_to_handle = ",".join(handled)
        try:
            torchrun.run(args)
        except ChildFailedError as e:
            if keep_traceback:
                raise
            line, status = failure_line(e.failures)
            if terminate.received:  # the workers were still starting: nothing of theirs to save
                line = line.replace(
                    "launch.torchrun: ", "launch.torchrun: SIGTERM passed to the workers; ", 1
                )
            print(line, file=sys.stderr, flush=True)
            return status
        except SignalException as e:
            if keep_traceback:
                raise
            name = signal.Signals(e.sigval).name
            print(
                f"launch.torchrun: {name}: passed to the workers and stopped them; re-run the same command to "
                "resume from the newest checkpoint",
                file=sys.stderr,
                flush=True,
            )
            return exit_status(-int(e.sigval))
        except RendezvousError as e:
            if keep_traceback:
                raise
            print(f"launch.torchrun: rendezvous failed: {e}", file=sys.stderr, flush=True)
            return RENDEZVOUS_EXIT
    except SystemExit:
        if terminate.received:
            print("launch.torchrun: SIGTERM before any worker started; nothing to save", file=sys.stderr)
        raise
    except KeyboardInterrupt:  # SIGINT before torchrun's own handler (installed with the workers) took over
        if keep_traceback:
            raise
        print("launch.torchrun: SIGINT before any worker started; nothing to save", file=sys.stderr)
        return exit_status(-signal.SIGINT)
    if terminate.received:
        print(
            "launch.torchrun: SIGTERM: passed to the workers, which stopped cleanly (a trainer "
            "checkpoints first: its line above says at which step); re-run the same command to resume",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
