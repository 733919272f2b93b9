"""The wire format rules: what travels, where it lands, and which configurations are refused.

``kv_transfer_dtype``:

- ``fp8`` (default): ``float8_e4m3fn`` data with a float32 scale per token per head. The
  scales travel with the data, so they are dynamic (computed per token, not calibrated).
- ``auto``: the model dtype, lossless. Both pools must then be ``auto``.

Where the bytes come from and land::

    prefill pool   wire   decode pool    source          destination
    fp8            fp8    fp8            pool            pool
    fp8            fp8    auto           pool            staging, dequantized on arrival
    auto           fp8    fp8            send buffer     pool
    auto           fp8    auto           send buffer     staging, dequantized on arrival
    auto           auto   auto           pool            pool
    (anything else is refused)
"""

from __future__ import annotations

import heapq
from enum import Enum

# The rules live with the cluster config, which the light base validates without torch.
from pdserve.config import check_wire as check_wire
from pdserve.config import lands_in_staging


class Source(Enum):
    """Where a sending rank's wire bytes are read from: its pool or a registered fp8 buffer."""

    POOL = "pool"
    SEND_BUFFER = "send_buffer"  # a pool in the model dtype quantized for an fp8 wire


class Target(Enum):
    """Where wire bytes land on the receiving rank: its pool, or a registered fp8 staging
    area dequantized on arrival."""

    POOL = "pool"
    STAGING = "staging"  # an fp8 wire into a pool in the model dtype


def source_of(kv_transfer_dtype: str, pool_kv_cache_dtype: str) -> Source:
    """Where a rank's wire bytes live; a destination's landing area follows the same rule
    (``target_of``), so ``WireRegion`` asks this one."""
    if lands_in_staging(kv_transfer_dtype, pool_kv_cache_dtype):
        return Source.SEND_BUFFER
    return Source.POOL


def target_of(kv_transfer_dtype: str, pool_kv_cache_dtype: str) -> Target:
    if lands_in_staging(kv_transfer_dtype, pool_kv_cache_dtype):
        return Target.STAGING
    return Target.POOL


class SlotPool:
    """Fixed slots of a staging area or send buffer, handed out lowest id first.

    ``allocate`` returns ``None`` when short, like the block manager; the caller decides.
    """

    def __init__(self, num_slots: int):
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap
        self._is_free = [True] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        slots = [heapq.heappop(self._free) for _ in range(count)]
        for slot in slots:
            self._is_free[slot] = False
        return slots

    def free(self, slots: list[int]) -> None:
        for slot in slots:
            if not 0 <= slot < self.num_slots or self._is_free[slot]:
                raise RuntimeError(f"slot {slot} freed twice or never allocated")
            self._is_free[slot] = True
            heapq.heappush(self._free, slot)
