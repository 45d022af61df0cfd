"""The roll call's verdicts on live, dead and departed peers, in one process (the multi-process cases,
a rank killed under gloo, are in test_reliability_peers and test_torchrun_launcher)."""

from __future__ import annotations

import socket
import threading
import time

from launch.distributed.roll_call import RollCall


def _caller(rank: int, peers: list) -> RollCall:
    """A RollCall without a process group: its peers' addresses given directly."""
    call = RollCall.__new__(RollCall)
    call.rank, call.world, call.left, call.peers = rank, len(peers), set(), peers
    return call


def _live_peer() -> tuple[RollCall, tuple[str, int]]:
    peer = RollCall.__new__(RollCall)
    peer.rank, peer.left = 9, set()
    peer.listener = socket.socket()
    peer.listener.bind(("127.0.0.1", 0))
    peer.listener.listen(8)
    threading.Thread(target=peer._serve, daemon=True).start()
    return peer, peer.listener.getsockname()


def _dead_address() -> tuple[str, int]:
    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def test_a_gone_process_is_missing_and_a_live_one_is_not():
    live, live_address = _live_peer()
    call = _caller(0, [None, live_address, _dead_address(), live_address])
    t0 = time.monotonic()
    assert call.missing(grace_s=2.0) == [2]
    assert time.monotonic() - t0 < 1.0  # a refusal is immediate: no waiting for the grace period
    assert live.left == {0}  # the caller said it is leaving


def test_a_survivor_that_left_first_is_not_counted_lost():
    call = _caller(0, [None, _dead_address(), _dead_address()])
    call.left.add(1)  # rank 1 told this rank it was leaving, then exited
    assert call.missing(grace_s=1.0) == [2]


def test_a_silent_peer_is_missing_after_the_grace_period():
    # Listening but never accepting or answering: past the backlog the kernel completes the handshake
    # and the caller's message gets no answer, as with a frozen node.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    call = _caller(0, [None, silent.getsockname()])
    t0 = time.monotonic()
    assert call.missing(grace_s=0.5) == [1]
    assert 0.4 < time.monotonic() - t0 < 3.0
    silent.close()
