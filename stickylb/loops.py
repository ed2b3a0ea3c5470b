"""Event-loop selection, made once before any loop or session exists."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

LoopChoice = Literal["auto", "asyncio", "uvloop"]
LOOP_CHOICES: tuple[LoopChoice, ...] = ("auto", "asyncio", "uvloop")


def loop_factory(choice: LoopChoice = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when wanted and installed; None means the stdlib default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError(
                "--loop uvloop: uvloop is not installed (pip install 'stickylb[speed]')"
            ) from None
        return None
    return uvloop.new_event_loop


def loop_name(factory: Callable[[], asyncio.AbstractEventLoop] | None) -> str:
    return "asyncio" if factory is None else "uvloop"
