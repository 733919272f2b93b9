"""The decode side of the KV plane: expect a request's KV, learn when it landed or failed.

Every decode rank has a consumer over its pool (and, for an fp8 wire into a pool in the model
dtype, a staging area). Every prefill rank that writes sends its notice to decode rank 0,
after *all* its writes to *all* decode ranks completed; so rank 0 alone knows when a
request's KV has landed everywhere, and the other ranks only keep their staging bookkeeping.

A request's blocks are safe to reuse once ``poll`` reports it LANDED or RELEASED. After
FAILED (a deadline, or a sender that gave up) they are not yet: a write could still land
until every sender has reported or been removed as dead; RELEASED follows then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from engine.kv_cache import KVCache, dequantize_fp8
from kvtransfer.agent import Agent
from kvtransfer.checksum import BlockDigest, Mismatch, RegionBytes, check
from kvtransfer.endpoint import Endpoint, Notice, NoticeKind, WireRegion
from kvtransfer.layout import head_routes, senders, writes_into

logger = logging.getLogger(__name__)


class EventKind(Enum):
    """What ``KVConsumer.poll`` reports about one attempt at a request's remote KV."""

    LANDED = "landed"  # every sender's writes completed: run the last prompt token
    FAILED = "failed"  # give up on this attempt (fall back); blocks not yet reusable
    RELEASED = "released"  # after FAILED or cancel: no write can land any more


class TransferEvent(NamedTuple):
    """One change in a request attempt's remote KV; ``reason`` says why it failed
    (empty when it landed)."""

    request_id: str
    attempt: int
    kind: EventKind
    reason: str


@dataclass(slots=True)
class _Expected:
    attempt: int
    pool_blocks: list[int]
    slots: list[int] | None  # staging slots, when the wire lands in staging
    pending: set[str]  # senders (agent names) that have not reported
    deadline: float
    num_sources: int  # the sending group's TP size
    digests: list[BlockDigest] = field(default_factory=list)  # from DONE notices (rank 0)
    failure: str = ""
    is_cancelled: bool = False
    is_reported: bool = False  # LANDED or FAILED already returned
    is_released: bool = False


class KVConsumer:
    """One decode rank's receiver: an agent over its pool (and staging), and the requests it
    waits for."""

    def __init__(self, kv_cache: KVCache, *, agent_name: str, tp_rank: int, tp_size: int,
                 num_kv_heads: int, kv_transfer_dtype: str = "fp8", staging_blocks: int = 256):
        self.kv_cache = kv_cache
        self.tp_rank, self.tp_size, self.num_kv_heads = tp_rank, tp_size, num_kv_heads
        self.region = WireRegion(kv_cache, kv_transfer_dtype, staging_blocks)
        self.agent = Agent(agent_name, self.region.registered_tensors(kv_cache))
        self._wire_bytes = RegionBytes(self.region.data, self.region.scales,
                                       self.region.geometry)
        self._expected: dict[str, _Expected] = {}
        self.num_stale_notices = 0

    def endpoint(self) -> Endpoint:
        return self.region.endpoint(self.agent.name, self.agent.metadata, self.tp_rank,
                                    self.tp_size, self.num_kv_heads)

    def add_peer(self, peer: Endpoint) -> None:
        """Meet a prefill rank (so it can be removed by name when it dies)."""
        if peer.num_kv_heads != self.num_kv_heads:
            raise ValueError(f"peer {peer.agent_name} has num_kv_heads={peer.num_kv_heads}, "
                             f"this rank {self.num_kv_heads}")
        self.agent.add_peer(peer.metadata)

    def remove_peer(self, agent_name: str) -> None:
        """A prefill rank is dead (or restarted under a new name): nothing more comes from
        it, so every request waiting on it resolves."""
        for request_id, expected in self._expected.items():
            if agent_name in expected.pending:
                expected.pending.discard(agent_name)
                expected.failure = expected.failure or f"sender {agent_name} removed"
                logger.debug("request %s: sender %s removed", request_id, agent_name)
        self.agent.remove_peer(agent_name)

    def expect(self, request_id: str, attempt: int, pool_blocks: list[int],
               sources: list[str], timeout_s: float) -> list[int] | None:
        """Wait for a request's KV from a prefill group (its agents by TP rank).

        Returns the block ids the producer must write (pool blocks, or staging slots), or
        None when the staging area is short (prefill locally instead).
        """
        if request_id in self._expected:
            raise ValueError(f"request {request_id!r} is already expected")
        slots = None
        if self.region.slots is not None:
            slots = self.region.slots.allocate(len(pool_blocks))
            if slots is None:
                return None
        routes = head_routes(self.num_kv_heads, len(sources), self.tp_size)
        pending = {sources[rank] for rank in senders(routes)} if self.tp_rank == 0 else set()
        self._expected[request_id] = _Expected(attempt, list(pool_blocks), slots, pending,
                                               time.monotonic() + timeout_s, len(sources))
        return list(pool_blocks) if slots is None else list(slots)

    def cancel(self, request_id: str) -> None:
        """Stop waiting; RELEASED follows once every sender confirmed or was removed."""
        expected = self._expected[request_id]
        expected.is_cancelled = True
        expected.failure = expected.failure or "cancelled"
        expected.is_reported = True  # the caller knows; only RELEASED is still to come

    def release(self, request_id: str) -> None:
        """The senders confirmed out of band that they never wrote (the job was dropped
        before it started): nothing more will come for this attempt."""
        expected = self._expected[request_id]
        expected.pending.clear()
        expected.failure = expected.failure or "never sent"

    def poll(self) -> list[TransferEvent]:
        """Read notices, apply deadlines; what changed since the last poll (rank 0 only)."""
        for sender, message in self.agent.notices():
            self._receive(sender, Notice.decode(message))
        now = time.monotonic()
        events = []
        for request_id, expected in self._expected.items():
            if expected.is_released:
                continue
            if not expected.is_reported:
                if not expected.pending and not expected.failure:
                    expected.is_reported = expected.is_released = True
                    events.append(TransferEvent(request_id, expected.attempt,
                                                EventKind.LANDED, ""))
                    continue
                if not expected.failure and now > expected.deadline:
                    expected.failure = "deadline passed"
                if expected.failure:
                    expected.is_reported = True
                    events.append(TransferEvent(request_id, expected.attempt,
                                                EventKind.FAILED, expected.failure))
            if expected.is_reported and not expected.pending:
                expected.is_released = True
                events.append(TransferEvent(request_id, expected.attempt, EventKind.RELEASED,
                                            expected.failure))
        return events

    def digests(self, request_id: str) -> list[BlockDigest]:
        """Every sender's digests of a request's writes, once LANDED (rank 0 only)."""
        return list(self._expected[request_id].digests)

    def landed_blocks(self, request_id: str) -> list[int]:
        """Where a request's wire bytes land on this rank: pool blocks or staging slots."""
        expected = self._expected[request_id]
        return list(expected.pool_blocks if expected.slots is None else expected.slots)

    def verify(self, request_id: str, digests: list[BlockDigest]) -> list[Mismatch]:
        """Check the wire bytes that landed on this rank (before ``finish`` dequantizes
        staging) against the digests for this rank; the ones that do not match."""
        routes = head_routes(self.num_kv_heads, self._expected[request_id].num_sources,
                             self.tp_size)
        return check(self._wire_bytes, writes_into(routes, self.tp_rank), digests,
                     self.landed_blocks(request_id))

    def finish(self, request_id: str, materialize: bool) -> None:
        """Done with a request on this rank: dequantize staging into the pool if its KV
        landed (``materialize``), free its staging slots either way."""
        expected = self._expected.pop(request_id)
        if self.tp_rank == 0 and not expected.is_released:
            self._expected[request_id] = expected
            raise RuntimeError(f"request {request_id!r}: a write could still land")
        if expected.slots is None:
            return
        if materialize:
            self._materialize(expected.pool_blocks, expected.slots)
        self.region.slots.free(expected.slots)

    @property
    def num_free_staging_blocks(self) -> int | None:
        return None if self.region.slots is None else self.region.slots.num_free

    @property
    def num_expected(self) -> int:
        return len(self._expected)

    def close(self) -> None:
        self.agent.close()

    def _receive(self, sender: str, notice: Notice) -> None:
        expected = self._expected.get(notice.request_id)
        if expected is None or expected.attempt != notice.attempt:
            self.num_stale_notices += 1
            logger.debug("dropped a %s notice for request %s attempt %d from %s",
                         notice.kind.value, notice.request_id, notice.attempt, sender)
            return
        if sender not in expected.pending:
            return
        expected.pending.discard(sender)
        expected.digests += notice.digests
        if notice.kind is not NoticeKind.DONE:
            expected.failure = expected.failure or f"sender {sender}: {notice.kind.value}"

    def _materialize(self, pool_blocks: list[int], slots: list[int]) -> None:
        device = self.kv_cache.data.device
        blocks = torch.tensor(pool_blocks, device=device)
        source = torch.tensor(slots, device=device)
        # A layer at a time: whole-request temporaries (tens of MB) cost more in page faults
        # than the arithmetic on CPU; per layer they stay small (47 -> 19 ms for 64 blocks
        # of the small model in a one-off timing).
        for layer in range(self.region.data.shape[0]):
            # [2, n, heads, block_size, head_dim] from fp8 staging and its scales
            values = dequantize_fp8(self.region.data[layer].index_select(1, source),
                                    self.region.scales[layer].index_select(1, source),
                                    self.kv_cache.dtype)
            self.kv_cache.data[layer].index_copy_(1, blocks, values)
