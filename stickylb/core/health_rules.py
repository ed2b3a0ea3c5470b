"""Theory of operation: what counts as a healthy answer, and when a backend changes state.

Pure rules, no I/O. The checker (``health.py``) performs a probe and feeds the outcome here:

- ``ALGORITHMS`` maps an algorithm name to a verdict on (status, body). ``http-status`` wants a
  2xx, ``http`` takes any HTTP answer. ``expectStatus`` / ``expectBody`` narrow either one.
- ``HealthTracker`` owns the rise/fall counters of one backend. Its invariant: the state only
  changes after ``rise`` consecutive successes (down -> up) or ``fall`` consecutive failures
  (up -> down), except for the very first verdict, which sets the initial state directly, and
  ``force_down`` (passive detection), which marks it down at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Verdict = Callable[[int], bool]

ALGORITHMS: dict[str, Verdict] = {
    "http-status": lambda status: 200 <= status < 300,
    "http": lambda status: True,
}


def parse_status_ranges(value: object) -> tuple[tuple[int, int], ...]:
    """Parse ``expectStatus``: 200, "200-399", "200,204,300-399" or a list of those."""
    items: list[object]
    if isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    else:
        items = [value]
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError('expected status codes such as 200, "200-399" or [200, 204]')
        if isinstance(item, int):
            low = high = item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d{3}\s*(-\s*\d{3}\s*)?", item):
            low_s, _, high_s = item.partition("-")
            low, high = int(low_s), int(high_s or low_s)
        else:
            raise ValueError('expected status codes such as 200, "200-399" or [200, 204]')
        if not (100 <= low <= high <= 599):
            raise ValueError(f"status range {low}-{high} is outside 100-599 or reversed")
        ranges.append((low, high))
    if not ranges:
        raise ValueError("expected at least one status code")
    return tuple(ranges)


@dataclass(frozen=True, slots=True)
class ResponseRule:
    """The verdict on one HTTP answer to a health probe."""

    algorithm: str = "http-status"
    expect_status: tuple[tuple[int, int], ...] | None = None
    expect_body: str | None = None

    @property
    def needs_body(self) -> bool:
        return self.expect_body is not None

    def judge(self, status: int, body: str = "") -> str | None:
        """Return None when healthy, else the reason it is not."""
        if self.expect_status is not None:
            if not any(low <= status <= high for low, high in self.expect_status):
                return f"status {status}"
        elif not ALGORITHMS[self.algorithm](status):
            return f"status {status}"
        if self.expect_body is not None and not _body_matches(self.expect_body, body):
            return "body did not match expectBody"
        return None


def _body_matches(expected: str, body: str) -> bool:
    if expected in body:
        return True
    try:
        return re.search(expected, body) is not None
    except re.error:
        return False


@dataclass(slots=True)
class HealthTracker:
    """Rise/fall bookkeeping for one backend; returns True from ``record`` on a state change."""

    rise: int
    fall: int
    healthy: bool = True
    checked: bool = False
    successes: int = 0
    failures: int = 0
    last_reason: str | None = None

    def record(self, ok: bool, reason: str | None = None) -> bool:
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
            self.last_reason = reason or "check failed"
        if not self.checked:
            self.checked = True
            changed = self.healthy != ok
            self.healthy = ok
            return changed
        if self.healthy and not ok and self.failures >= self.fall:
            self.healthy = False
            return True
        if not self.healthy and ok and self.successes >= self.rise:
            self.healthy = True
            return True
        return False

    def force_down(self, reason: str) -> bool:
        """Passive detection: mark down now; only active checks bring it back."""
        self.last_reason = reason
        self.successes = 0
        self.checked = True
        if not self.healthy:
            return False
        self.healthy = False
        return True
