"""The admission queue: first come, first served, bounded in size and time."""

from __future__ import annotations

import asyncio

from stickylb.core.admission import Admission


async def test_waiters_are_served_in_arrival_order_and_newcomers_do_not_barge():
    admission = Admission(max_active=1, max_queue=10, queue_timeout=5)
    assert await admission.enter()
    order: list[int] = []

    async def request(n: int) -> None:
        assert await admission.enter()
        order.append(n)
        await asyncio.sleep(0.01)
        admission.leave()

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(request(n)))
        await asyncio.sleep(0)  # arrive in this order
    admission.leave()
    late = asyncio.create_task(request(99))  # arrives when a slot is momentarily free
    await asyncio.gather(*tasks, late)
    assert order == [0, 1, 2, 3, 4, 99]
    assert admission.active == 0 and admission.queued == 0


async def test_queue_bound_and_timeout():
    admission = Admission(max_active=1, max_queue=1, queue_timeout=0.2)
    assert await admission.enter()
    waiting = asyncio.create_task(admission.enter())
    await asyncio.sleep(0)
    assert admission.queued == 1
    assert await admission.enter() is False  # the queue is full: no wait at all
    assert await waiting is False  # timed out
    assert admission.queued == 0 and admission.active == 1
