"""Which ranks are still there, asked when a collective fails: naming the lost rank beyond two ranks.

A survivor of a dead peer learns only "connection closed by peer [address]:port" from gloo (NCCL says
less), and with more than two ranks that does not say which rank died. So each rank of a job with more
than two ranks listens on a TCP port of its own, answered by a daemon thread, and the ranks exchange
these addresses once, when the process group starts (one small all-gather). A survivor connects to
every peer at once: a process that is gone has no listening socket any more (the kernel refuses the
connection at once) and a lost node does not answer before the deadline; a live process answers even
while its main thread sits in a collective (torch releases the GIL there).

A survivor tells each peer it is leaving in the same exchange, so a slower survivor, which may reach
the roll call only after a faster one has exited (a collective fails when its peers exit), does not
count it among the lost. Why not the rendezvous store: it lives in rank 0 or in node 0's torchrun, so
it is gone exactly when rank 0 is lost, and a client blocked on a store that goes away prints C++
stacks. Nothing is sent while training: the cost is one idle socket and thread per rank.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time

import torch.distributed as dist

GRACE_S = 2.0  # how long a survivor waits for answers (live peers answer within milliseconds)


class RollCall:
    """This rank's listening socket, the peers' addresses, and the survivors that said they leave."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.left: set[int] = set()  # peers that said they stop because of a lost rank (not lost themselves)
        address = None
        try:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind((_reachable_address(), 0))
            self.listener.listen(128)
            address = self.listener.getsockname()
            threading.Thread(target=self._serve, name="launch-roll-call", daemon=True).start()
        except OSError:  # no address to listen on: this rank cannot be asked, and is never named
            pass
        # Every rank joins the all-gather, with or without an address: one that skipped it would
        # leave the others waiting in it.
        gathered: list[tuple[str, int] | None] = [None] * world
        dist.all_gather_object(gathered, address)
        self.peers: list[tuple[str, int] | None] = [tuple(a) if a else None for a in gathered]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ValueError), conn:
                conn.settimeout(1.0)
                message = conn.recv(32).decode()
                if message.startswith("leaving "):
                    self.left.add(int(message.split()[1]))
                conn.sendall(b"here")

    def missing(self, grace_s: float = GRACE_S) -> list[int]:
        """The peers that are gone (refused, or silent for `grace_s`), less those that said they left."""
        selector = selectors.DefaultSelector()
        pending: dict[socket.socket, int] = {}
        gone: set[int] = set()
        for r, address in enumerate(self.peers):
            if r == self.rank or address is None:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            if s.connect_ex(address) not in (0, 115):  # 115: EINPROGRESS (Linux)
                gone.add(r)
                s.close()
                continue
            selector.register(s, selectors.EVENT_WRITE)
            pending[s] = r
        end = time.monotonic() + grace_s
        while pending and (left_s := end - time.monotonic()) > 0:
            for key, events in selector.select(timeout=left_s):
                s, r = key.fileobj, pending[key.fileobj]
                try:
                    if events & selectors.EVENT_WRITE:
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            raise ConnectionRefusedError
                        s.send(f"leaving {self.rank}".encode())
                        selector.modify(s, selectors.EVENT_READ)
                        continue
                    if not s.recv(8):  # closed without an answer: the process went away meanwhile
                        raise ConnectionResetError
                except OSError:
                    gone.add(r)
                selector.unregister(s)
                s.close()
                del pending[s]
        gone.update(pending.values())  # no answer by the deadline: a lost node (or a frozen process)
        for s in pending:
            s.close()
        selector.close()
        return sorted(gone - self.left)


def _reachable_address() -> str:
    """This host's address on the route to the rendezvous host (MASTER_ADDR), which the other ranks
    can reach; a UDP connect sends nothing, it only picks the route."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
        return probe.getsockname()[0]
    return socket.gethostbyname(socket.gethostname())


_ACTIVE: RollCall | None = None


def start(rank: int, world: int) -> None:
    """Answer roll calls from now on. Called by every rank once the default process group exists (it
    all-gathers the addresses); a no-op for two ranks or fewer, where a survivor knows who is lost."""
    global _ACTIVE
    if world > 2 and _ACTIVE is None and dist.is_initialized():
        _ACTIVE = RollCall(rank, world)


def missing_ranks(grace_s: float = GRACE_S) -> list[int] | None:
    """The ranks that are gone (`RollCall.missing`); None when no roll call was started."""
    return _ACTIVE.missing(grace_s) if _ACTIVE is not None else None
