"""Admission: a bounded number of requests in flight, a bounded priority queue before them.

A request takes a slot at once when one is free and nobody waits; otherwise it waits in the
queue, lower ``priority`` first and first-come within a priority. A full queue refuses at
once (the router answers 429 with ``Retry-After``) rather than letting latency grow without
bound. Runs on the router's event loop only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


class QueueFull(Exception):
    """No slot and no room to wait."""


@dataclass(order=True, slots=True)
class _Waiter:
    priority: int
    arrival: int
    future: asyncio.Future = field(compare=False)


class Admission:
    """At most ``max_running`` requests in flight and ``max_queue`` waiting, served by
    priority then arrival. Event-loop only: not thread-safe."""

    def __init__(self, max_running: int, max_queue: int):
        if max_running < 1:
            raise ValueError(f"max_running={max_running} is invalid: must be >= 1")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} is invalid: must be >= 0")
        self.max_running, self.max_queue = max_running, max_queue
        self.num_running = 0
        self._waiters: list[_Waiter] = []
        self._num_waiting = 0  # waiters not yet cancelled (the heap drops those lazily)
        self._arrivals = itertools.count()

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for it."""
        if self.num_running < self.max_running and not self._num_waiting:
            self.num_running += 1
            return True
        return False

    async def acquire(self, priority: int = 0) -> None:
        """Wait for a slot; ``QueueFull`` when the queue is full. Pair with ``release``."""
        if self.try_acquire():
            return
        if self._num_waiting >= self.max_queue:
            raise QueueFull(f"{self.num_running} requests running and {self._num_waiting} "
                            f"queued (router.max_queue={self.max_queue})")
        waiter = _Waiter(priority, next(self._arrivals),
                         asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, waiter)
        self._num_waiting += 1
        try:
            await waiter.future  # the slot was handed over by ``release``
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # handed a slot in the same instant: pass it on
            else:
                self._num_waiting -= 1
                waiter.future.cancel()
                self._compact()
            raise

    def _compact(self) -> None:
        """Drop cancelled waiters once they outnumber the live ones (the heap drops them
        lazily; under churn they would pile up)."""
        if len(self._waiters) > 2 * self._num_waiting + 64:
            self._waiters = [w for w in self._waiters if not w.future.done()]
            heapq.heapify(self._waiters)

    def release(self) -> None:
        """Give the slot to the best waiter, or free it."""
        while self._waiters:
            waiter = heapq.heappop(self._waiters)
            if not waiter.future.done():
                self._num_waiting -= 1
                waiter.future.set_result(None)
                return
        self.num_running -= 1
        if self.num_running < 0:
            raise RuntimeError("Admission.release without acquire")
