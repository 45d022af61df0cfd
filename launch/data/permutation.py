"""A seeded permutation of [0, n) evaluated per index, with no array of n entries.

A balanced Feistel network over the smallest even number of bits covering n is a bijection of
[0, 2^bits); "cycle walking" (re-applying it to outputs >= n, at most ~4x on average since
2^bits < 4n) restricts it to a bijection of [0, n). The round function is splitmix64's finaliser
keyed per round from numpy's seeded generator, so the order is a pure function of (seed, n): a
position in it can be computed for any index in O(1), which makes resume exact at any world size
and lets an epoch of 50M windows cost nothing to set up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class IndexPermutation:
    """perm(i) for i in [0, n): a seeded bijection. `seed` is an int or a sequence of ints."""

    def __init__(self, n: int, seed: int | Sequence[int]):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = (
            np.random.default_rng(seed).integers(0, 2**63, size=ROUNDS, dtype=np.int64).astype(np.uint64)
        )

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        x = np.asarray(indices, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"indices outside [0, {self.n})")
        with np.errstate(over="ignore"):
            out = self._feistel(x.astype(np.uint64))
            walk = out >= self.n
            while walk.any():
                out[walk] = self._feistel(out[walk])
                walk = out >= self.n
        return out.astype(np.int64)
