"""Admission on its own: exact slot hand-over order, refusals and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from router.admission import Admission, QueueFull


async def _run_ready_tasks() -> None:
    """One pass of the event loop: every task started so far runs to its first wait."""
    await asyncio.sleep(0)


def test_waiters_are_served_by_priority_then_arrival():
    async def scenario() -> list[str]:
        admission = Admission(max_running=1, max_queue=4)
        order: list[str] = []
        await admission.acquire()

        async def wait(name: str, priority: int) -> None:
            await admission.acquire(priority)
            order.append(name)
            admission.release()

        tasks = [asyncio.ensure_future(wait(name, priority)) for name, priority in
                 (("b5", 5), ("a1", 1), ("c5", 5), ("d0", 0))]
        await _run_ready_tasks()
        assert admission.num_waiting == 4
        with pytest.raises(QueueFull):
            await admission.acquire()
        admission.release()
        await asyncio.gather(*tasks)
        assert (admission.num_running, admission.num_waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["d0", "a1", "b5", "c5"]


def test_a_cancelled_waiter_gives_up_its_place():
    async def scenario() -> None:
        admission = Admission(max_running=1, max_queue=1)
        await admission.acquire()
        waiter = asyncio.ensure_future(admission.acquire())
        await _run_ready_tasks()
        assert admission.num_waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.num_waiting == 0
        admission.release()
        assert (admission.num_running, admission.num_waiting) == (0, 0)
        await admission.acquire()  # the slot is free again, nobody waits
        assert admission.num_running == 1

    asyncio.run(scenario())


def test_a_slot_handed_to_a_waiter_cancelled_at_once_passes_on():
    async def scenario() -> None:
        admission = Admission(max_running=1, max_queue=2)
        await admission.acquire()
        first = asyncio.ensure_future(admission.acquire())
        second = asyncio.ensure_future(admission.acquire())
        await _run_ready_tasks()
        admission.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        await second  # so the slot went on to `second`
        assert (admission.num_running, admission.num_waiting) == (1, 0)

    asyncio.run(scenario())


def test_bad_limits_name_the_field():
    with pytest.raises(ValueError, match="max_running=0"):
        Admission(max_running=0, max_queue=1)
    with pytest.raises(ValueError, match="max_queue=-1"):
        Admission(max_running=1, max_queue=-1)


def test_cancelled_waiters_do_not_pile_up():
    async def scenario() -> int:
        admission = Admission(max_running=1, max_queue=1000)
        await admission.acquire()
        for _ in range(500):  # waiters that give up, as timed-out clients do
            waiter = asyncio.ensure_future(admission.acquire())
            await _run_ready_tasks()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert admission.num_waiting == 0
        return len(admission._waiters)

    assert asyncio.run(scenario()) <= 65
