"""What ranks tell each other about their KV memory, and the notices they exchange.

An ``Endpoint`` travels over the request plane (as a plain dict) when workers meet: a
producer needs the consumer's to write into it, a consumer needs the producer's to name it.
A notice travels over NIXL, after the writes it vouches for have completed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

from engine.kv_cache import FP8_DTYPE, KVCache
from kvtransfer.checksum import BlockDigest, pack, unpack
from kvtransfer.layout import DATA, RegionGeometry, descriptor_array
from kvtransfer.wire import SlotPool, Source, source_of

NOTICE_VERSION = 2  # 2: the DONE notice carries the sender's KV digests


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One rank's KV plane identity: its agent and the region peers write into or read."""

    agent_name: str
    metadata: bytes
    tp_rank: int
    tp_size: int
    num_kv_heads: int  # the model's, not the rank's
    device_id: int
    geometry: RegionGeometry
    data_address: int
    scales_address: int  # 0 on an ``auto`` wire

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> Endpoint:
        fields = dict(fields)
        fields["geometry"] = RegionGeometry(**fields["geometry"])
        return cls(**fields)

    def descriptors(self, first_head: int, num_heads: int) -> np.ndarray:
        """``[N, 2]`` (address, length) for ``layout.descriptor_array``'s entries."""
        table = descriptor_array(self.geometry, first_head, num_heads)
        bases = np.where(table[:, 0] == DATA, self.data_address, self.scales_address)
        return np.stack([bases + table[:, 1], table[:, 2]], axis=1)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one request's KV goes: the decode group's agents by TP rank (rank 0 receives
    the notices) and the block ids to fill, the same on every rank."""

    agents: tuple[str, ...]
    block_ids: tuple[int, ...]


class NoticeKind(Enum):
    """What a sender's notice says about its writes for one request attempt."""

    DONE = "done"  # every write this sender posted for the request has completed
    FAILED = "failed"  # the sender gave up; none of its writes is still in flight
    CANCELLED = "cancelled"  # cancel honoured; none of its writes is still in flight


class Notice(NamedTuple):
    """A prefill rank's (``src_rank``) last word on one request attempt, sent to decode
    rank 0 over NIXL once its writes (``num_bytes`` in all) are no longer in flight, with
    the digests of what it wrote (``kv_transfer_checksum``; none when off);
    ``encode``/``decode`` give its versioned msgpack form."""

    kind: NoticeKind
    request_id: str
    attempt: int
    src_rank: int
    num_bytes: int
    digests: tuple[BlockDigest, ...] = ()

    def encode(self) -> bytes:
        return msgpack.packb([NOTICE_VERSION, self.kind.value, self.request_id, self.attempt,
                              self.src_rank, self.num_bytes, pack(list(self.digests))])

    @classmethod
    def decode(cls, message: bytes) -> Notice:
        fields = msgpack.unpackb(message)
        if fields[0] != NOTICE_VERSION:
            raise ValueError(f"notice version {fields[0]}, expected {NOTICE_VERSION}")
        _, kind, request_id, attempt, src_rank, num_bytes, digests = fields
        return cls(NoticeKind(kind), request_id, attempt, src_rank, num_bytes,
                   tuple(unpack(src_rank, digests)))


class WireRegion:
    """The memory a rank's KV crosses the wire from or into: the pool itself, or (an fp8
    wire with a pool in the model dtype) a registered fp8 area of ``num_slots`` blocks."""

    def __init__(self, kv_cache: KVCache, kv_transfer_dtype: str, num_slots: int):
        pool_dtype = "fp8" if kv_cache.is_fp8 else "auto"
        self.is_pool = source_of(kv_transfer_dtype, pool_dtype) is Source.POOL
        if kv_transfer_dtype == "auto" and kv_cache.is_fp8:
            raise ValueError("kv_transfer_dtype='auto' needs kv_cache_dtype='auto' on both "
                             "sides, this pool is fp8: use kv_transfer_dtype='fp8'")
        if self.is_pool:
            self.data, self.scales = kv_cache.data, kv_cache.scales
            self.slots = None
        else:
            layers, _, _, heads, block_size, head_dim = kv_cache.data.shape
            # [layers, 2, num_slots, heads, block_size, head_dim] and its scales
            self.data = torch.zeros(layers, 2, num_slots, heads, block_size, head_dim,
                                    dtype=FP8_DTYPE, device=kv_cache.data.device)
            self.scales = torch.ones(layers, 2, num_slots, heads, block_size,
                                     dtype=torch.float32, device=kv_cache.data.device)
            self.slots = SlotPool(num_slots)
        layers, _, num_blocks, heads, block_size, head_dim = self.data.shape
        self.geometry = RegionGeometry(layers, num_blocks, heads, block_size, head_dim,
                                       self.data.element_size(), self.scales is not None)

    @property
    def device_id(self) -> int:
        return (self.data.device.index or 0) if self.data.is_cuda else 0

    def registered_tensors(self, kv_cache: KVCache) -> list[torch.Tensor]:
        """What a rank registers with NIXL once: its whole pool, and this area if separate."""
        tensors = [kv_cache.data, kv_cache.scales]
        if not self.is_pool:
            tensors += [self.data, self.scales]
        return [t for t in tensors if t is not None]

    def endpoint(self, agent_name: str, metadata: bytes, tp_rank: int, tp_size: int,
                 num_kv_heads: int) -> Endpoint:
        return Endpoint(agent_name, metadata, tp_rank, tp_size, num_kv_heads, self.device_id,
                        self.geometry, self.data.data_ptr(),
                        self.scales.data_ptr() if self.scales is not None else 0)
