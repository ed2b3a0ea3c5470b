"""Theory of operation: the counters behind ``/_lb/metrics`` and the dashboard (pure).

The hot path only bumps plain integers and fills plain bucket lists: on each ``Backend``
(``BackendStats``) and on the balancer's ``Stats``. Nothing here formats, locks or allocates per
request. ``metrics.py`` reads them at scrape time (a prometheus-client collector), and the
dashboard's events read them once a second.

A histogram is a list of per-bucket counts (not cumulative) plus a sum; ``observe`` puts one
value in its bucket with a bisection over the fixed bounds.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from ..config import SOURCE_KINDS

# Seconds: from a fast local answer to a slow one (Prometheus' defaults, plus 30 s and 60 s).
DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
AFFINITY_RESULTS = ("new", "hit", "repinned", "invalid")
# What places a client whose cookie names no backend that can take it: an affinity source, or
# else the strategy.
PLACED_BY = (*SOURCE_KINDS, "strategy")


@dataclass(slots=True)
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


def quantile(counts: list[int], q: float) -> float | None:
    """Seconds: the upper bound of the bucket that holds the ``q`` quantile of ``counts``
    (per-bucket counts), as coarse as the buckets are; None without a value."""
    total = sum(counts)
    if not total:
        return None
    running = 0
    for bound, count in zip((*DURATION_BUCKETS, DURATION_BUCKETS[-1]), counts, strict=True):
        running += count
        if running >= q * total:
            return bound
    return DURATION_BUCKETS[-1]


def cumulative(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts as Prometheus wants them: ``(le, count so far)``, ending with +Inf."""
    pairs, running = [], 0
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=False):
        running += count
        pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return pairs


@dataclass(slots=True)
class BackendStats:
    """What happened on one backend since start."""

    answers: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])  # by status class
    response_bytes: int = 0
    durations: Histogram = field(default_factory=Histogram)
    retries: int = 0  # requests retried elsewhere after failing here
    passive_failures: int = 0
    checks_passed: int = 0
    checks_failed: int = 0
    changes: Counter[str] = field(default_factory=Counter)  # state changes, by new state
    tunnels: int = 0  # WebSockets open now
    ws_messages_in: int = 0  # client -> backend, of closed WebSockets
    ws_messages_out: int = 0  # backend -> client


@dataclass(slots=True)
class Stats:
    """What happened in the balancer as a whole since start."""

    affinity: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # AFFINITY_RESULTS
    # Clients placed by an affinity source, by PLACED_BY index; the strategy's are the rest
    # (``placed_by``), so a request the strategy places bumps one counter, not two.
    placed: list[int] = field(default_factory=lambda: [0] * (len(PLACED_BY) - 1))
    own_answers: Counter[int] = field(default_factory=Counter)  # our own answers, by status
    queue_wait: Histogram = field(default_factory=Histogram)
    alerts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (channel, result)

    def affinity_results(self) -> dict[str, int]:
        """The affinity counters by name (``AFFINITY_RESULTS``)."""
        return dict(zip(AFFINITY_RESULTS, self.affinity, strict=True))

    def placed_by(self) -> dict[str, int]:
        """Clients placed (those without a cookie naming a backend that could take them), by
        what placed them (``PLACED_BY``)."""
        new, _, repinned, invalid = self.affinity
        by_sources = dict(zip(PLACED_BY, self.placed, strict=False))
        return {**by_sources, "strategy": new + repinned + invalid - sum(self.placed)}
