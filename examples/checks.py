"""Example custom health checks, referenced from config.example.json as "examples.checks:...".

A check receives a read-only view of the backend (``id``, ``url``, ``weight``, ``owner``,
``path``, ``method``, ``timeout``, ``headers``, ``health_url``) and, if it takes a second
argument, a ready ``aiohttp.ClientSession``. It returns something truthy for healthy. Raising,
returning something falsy, or running past the backend's health timeout marks a failure.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import aiohttp


async def reports_ok(backend: Any, session: aiohttp.ClientSession) -> bool:
    """Healthy when GET <url><path> answers JSON with "status": "ok" (async, uses the session)."""
    async with session.get(backend.health_url) as response:
        if response.status != 200:
            return False
        data = await response.json(content_type=None)
        return isinstance(data, dict) and data.get("status") == "ok"


def reports_ok_blocking(backend: Any) -> bool:
    """The same check written with a blocking client: sync checks run in a worker thread."""
    with urllib.request.urlopen(backend.health_url, timeout=backend.timeout) as response:
        data = json.load(response)
    return isinstance(data, dict) and data.get("status") == "ok"
