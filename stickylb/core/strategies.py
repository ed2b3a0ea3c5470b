"""Theory of operation: how a new client is spread over the available backends.

A strategy is a small object with one method, ``pick(candidates)``, handed a non-empty sequence
of backends that may take new clients. It does no I/O and never sees the sticky cookie: the pool
decides when balancing is needed at all. Adding a strategy means writing one class and adding
its name to ``STRATEGIES``.

Weights are relative. A backend of weight 0 is never picked for a new client (it only keeps the
clients already pinned to it).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Hashable, Sequence
from typing import Protocol, TypeVar


class Weighted(Protocol):
    """What a strategy needs to know of a backend."""

    @property
    def key(self) -> Hashable: ...

    @property
    def weight(self) -> float: ...

    @property
    def active(self) -> int: ...

    @property
    def elsewhere(self) -> int: ...


B = TypeVar("B", bound=Weighted)


class Strategy(Protocol):
    def pick(self, candidates: Sequence[B]) -> B: ...


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin: weights 5:1:1 give a a b a c a a, not a a a a a b c.

    Each pick adds every candidate's weight to its running score, takes the highest score and
    subtracts the total from the winner. Scores of backends that leave the candidate set are kept
    so a backend that flaps does not jump the queue when it returns.
    """

    def __init__(self) -> None:
        self._scores: dict[Hashable, float] = {}

    def pick(self, candidates: Sequence[B]) -> B:
        scores = self._scores
        total = 0.0
        best: B | None = None
        best_key: Hashable = None
        best_score = 0.0
        for backend in candidates:
            key, weight = backend.key, backend.weight
            score = scores.get(key, 0.0) + weight
            scores[key] = score
            total += weight
            if best is None or score > best_score:
                best, best_key, best_score = backend, key, score
        assert best is not None
        scores[best_key] = best_score - total
        return best


class LeastConnections:
    """Fewest active connections relative to weight; ties are broken in rotation. The count
    is this process's plus the last reported of the other workers or cluster instances."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[B]) -> B:
        loads = [(backend.active + backend.elsewhere) / backend.weight for backend in candidates]
        best_load = min(loads)
        tied = [
            backend for backend, load in zip(candidates, loads, strict=True) if load == best_load
        ]
        self._turn += 1
        return tied[self._turn % len(tied)]


class WeightedRandom:
    """A random backend, each with probability proportional to its weight."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[B]) -> B:
        return self._rng.choices(candidates, weights=[b.weight for b in candidates])[0]


class Hashed(Protocol):
    """What rendezvous hashing needs to know of a backend."""

    @property
    def hash_id(self) -> bytes: ...

    @property
    def weight(self) -> float: ...


H = TypeVar("H", bound=Hashed)
_TWO_64 = float(2**64)


def score(key: bytes, backend: Hashed) -> float:
    """The key's weighted rendezvous score on ``backend`` (highest wins): ``-w / ln(u)``, with
    ``u`` uniform in (0, 1) from a hash of the backend's id and the key. Deterministic: every
    process computes the same, so balancers sharing a config agree with nothing shared."""
    digest = hashlib.blake2b(backend.hash_id + key, digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _TWO_64
    return -backend.weight / math.log(u)


def rendezvous(key: bytes, candidates: Sequence[H]) -> H:
    """The key's first choice among ``candidates`` (non-empty), by weighted rendezvous
    (highest random weight) hashing: adding or removing a backend moves only the keys whose
    first choice it is."""
    return max(candidates, key=lambda backend: score(key, backend))


STRATEGIES: dict[str, type[Strategy]] = {
    "round-robin": SmoothWeightedRoundRobin,
    "least-connections": LeastConnections,
    "random": WeightedRandom,
}
