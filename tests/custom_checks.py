"""Custom health-check callables used by the tests, by import path ("tests.custom_checks:...")."""

from __future__ import annotations

import asyncio
import time

import aiohttp

CALLS: list[str] = []


def sync_ok(backend):
    CALLS.append(f"sync_ok:{backend.id}")
    return True


async def async_uses_session(backend, session: aiohttp.ClientSession):
    async with session.get(backend.url + "/health") as response:
        return response.status == 200


def raises(backend):
    raise ValueError("the database is gone")


def returns_false(backend):
    return False


async def hangs(backend):
    await asyncio.sleep(30)
    return True


def sync_hangs(backend):
    time.sleep(1.5)
    return True
