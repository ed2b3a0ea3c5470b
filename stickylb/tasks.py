"""Ending background tasks: one way, used by every piece that owns one."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` and wait until each has ended. Their own ``CancelledError`` (or any
    error they end with) is theirs; if the caller is cancelled meanwhile, that still reaches
    the caller."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)
