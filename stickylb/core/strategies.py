"""Theory of operation: how a new client is spread over the available backends.

A strategy is a small object with one method, ``pick(candidates)``, handed a non-empty sequence
of backends that may take new clients. It does no I/O and never sees the sticky cookie: the pool
decides when balancing is needed at all. Adding a strategy means writing one class and adding
its name to ``STRATEGIES``.

Weights are relative. A backend of weight 0 is never picked for a new client (it only keeps the
clients already pinned to it).
"""

from __future__ import annotations

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
    """Fewest active connections relative to weight; ties are broken in rotation."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[B]) -> B:
        best_load = min(backend.active / backend.weight for backend in candidates)
        tied = [backend for backend in candidates if backend.active / backend.weight == best_load]
        self._turn += 1
        return tied[self._turn % len(tied)]


class WeightedRandom:
    """A random backend, each with probability proportional to its weight."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[B]) -> B:
        return self._rng.choices(candidates, weights=[b.weight for b in candidates])[0]


STRATEGIES: dict[str, type[Strategy]] = {
    "round-robin": SmoothWeightedRoundRobin,
    "least-connections": LeastConnections,
    "random": WeightedRandom,
}
