"""Parsing of durations and byte sizes as they appear in config files, and times as the JSON
outputs show them.

Durations given as bare numbers are milliseconds, as in smart-stick-loadbalancer; strings take a
unit ("500ms", "10s", "2m", "1h"). Sizes are bytes, or strings with a unit ("64KiB", "16MB").
Both parsers return plain numbers (seconds, bytes) so nothing downstream deals with units.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
}


def parse_duration(value: object) -> float:
    """Return ``value`` in seconds: numbers are milliseconds, strings may carry a unit.

    >>> parse_duration(2000), parse_duration("1.5s"), parse_duration("2m")
    (2.0, 1.5, 120.0)
    """
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 2000 (ms), "500ms", "10s" or "2m"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value) / 1000.0
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            number, unit = match.groups()
            return float(number) * _DURATION_UNITS[(unit or "ms").lower()]
    raise ValueError('expected a duration such as 2000 (ms), "500ms", "10s" or "2m"')


def parse_size(value: object) -> int:
    """Return ``value`` in bytes: numbers are bytes, strings may carry a unit.

    >>> parse_size(1024), parse_size("16MiB"), parse_size("10kb")
    (1024, 16777216, 10000)
    """
    if isinstance(value, bool):
        raise ValueError('expected a size such as 1048576, "64KiB" or "16MB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            number, unit = match.groups()
            return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])
    raise ValueError('expected a size such as 1048576, "64KiB" or "16MB"')


def format_ms(seconds: float) -> int | float:
    """Seconds back to milliseconds, as an int when whole (for JSON output)."""
    ms = seconds * 1000.0
    return round(ms) if abs(ms - round(ms)) < 1e-6 else ms


def format_duration(seconds: float) -> str:
    """Seconds as a string that ``parse_duration`` reads back: "30s", "500ms"."""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{format_ms(seconds)}ms"


def iso(timestamp: float | None) -> str | None:
    """Unix seconds as the JSON outputs show them: ``2026-11-21T12:00:00.000Z``."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
