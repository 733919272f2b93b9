"""KV integrity on the wire: digests of the bytes a prefill rank wrote, checked where they landed.

A digest covers what one WRITE moved for one block of one layer along one head route: the
route's head range of K then V data, then (fp8 wire) of K then V scales, chained through
CRC-32 in that order. The sender reads its wire region (pool or send buffer), the receiver
its own (pool or fp8 staging, before dequantizing), each through its own geometry, so equal
digests mean equal bytes whatever the two tensor-parallel sizes::

    prefill rank s, wire block w          decode rank r, landed block t
    data[l][K][w][src_local:+n]   --->    data[l][K][t][dst_local:+n]     crc32(...
    data[l][V][w][src_local:+n]   --->    data[l][V][t][dst_local:+n]       chained
    scales[l][K|V][w][...]        --->    scales[l][K|V][t][...]            ...)

A digest names its (source rank, destination rank, layer, position in the request's block
list), so the receiver checks exactly what arrives and never needs the sender's sampling.
CRC-32 (zlib, ~4 GB/s on one core here) catches every burst error up to 32 bits and misses
other random corruption with probability 2^-32; it guards against faults, not against a
malicious peer. On CUDA the bytes are copied to the host range by range first (slow for
``all``, not yet run on a GPU): a device-side hash is not done.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import torch

from kvtransfer.layout import HeadRoute, RegionGeometry
from pdserve.choices import KVChecksum

SAMPLE_PERIOD = 16  # ``sample``: one (layer, block) in this many, and the last one


class BlockDigest(NamedTuple):
    """CRC-32 of what ``src_rank`` wrote into ``dst_rank`` for the block at ``position`` of a
    request's destination list, in ``layer``."""

    src_rank: int
    dst_rank: int
    layer: int
    position: int
    crc: int


class Mismatch(NamedTuple):
    """A digest the landed bytes do not match: ``block_id`` is where they landed on the
    receiving rank (pool block or staging slot); ``crc`` is None when the digest names a
    route, layer or position that rank never received."""

    digest: BlockDigest
    block_id: int
    crc: int | None


def selected(mode: KVChecksum, request_id: str, layer: int, positions: range,
             num_layers: int, num_blocks: int) -> list[int]:
    """The positions among ``positions`` whose ``layer`` is digested.

    ``sample`` takes the (layer, position) pairs whose index ``layer * num_blocks +
    position`` is ``crc32(request_id)`` modulo ``SAMPLE_PERIOD``, spread over every layer,
    plus the request's last block in its last layer: the last bytes posted, where a notice
    that outran its write would show first. A pure function of the request, not of how its
    sends were chunked.
    """
    if mode is KVChecksum.OFF:
        return []
    if mode is KVChecksum.ALL:
        return list(positions)
    phase = zlib.crc32(request_id.encode()) % SAMPLE_PERIOD
    last = (num_layers - 1, num_blocks - 1)
    return [p for p in positions
            if (layer * num_blocks + p) % SAMPLE_PERIOD == phase or (layer, p) == last]


class RegionBytes:
    """Byte views of a registered wire region (data and, on an fp8 wire, scales) that
    digests read, laid out by its ``RegionGeometry``."""

    def __init__(self, data: torch.Tensor, scales: torch.Tensor | None,
                 geometry: RegionGeometry):
        self.geometry = geometry
        tensors = [data] if scales is None else [data, scales]
        if len(tensors) != geometry.num_tensors:
            raise ValueError(f"{len(tensors)} tensors for a geometry with "
                             f"{geometry.num_tensors}")
        # [num_bytes] uint8 views of the same memory: the region is never moved
        self._flat = [t.view(torch.uint8).reshape(-1) for t in tensors]
        self._is_cuda = data.is_cuda
        self._host = None if self._is_cuda else [memoryview(f.numpy()) for f in self._flat]

    def digest(self, layer: int, block: int, first_head: int, num_heads: int) -> int:
        """CRC-32 of heads ``[first_head, first_head + num_heads)`` of ``block`` in
        ``layer``: K and V data, then K and V scales."""
        crc = 0
        for tensor in range(self.geometry.num_tensors):
            length = num_heads * self.geometry.head_bytes[tensor]
            for kv in (0, 1):
                start = self.geometry.offset(tensor, layer, kv, block, first_head)
                crc = zlib.crc32(self._read(tensor, start, length), crc)
        return crc

    def _read(self, tensor: int, start: int, length: int):
        if self._host is not None:
            return self._host[tensor][start:start + length]
        return self._flat[tensor][start:start + length].cpu().numpy()


def digest_route(region: RegionBytes, route: HeadRoute, layer: int, positions: list[int],
                 wire_blocks: list[int]) -> list[BlockDigest]:
    """The sender's digests of ``positions`` (its wire blocks ``wire_blocks[p]``) along
    ``route``."""
    return [BlockDigest(route.src_rank, route.dst_rank, layer, p,
                        region.digest(layer, wire_blocks[p], route.src_local, route.num_heads))
            for p in positions]


def check(region: RegionBytes, routes: list[HeadRoute], digests: list[BlockDigest],
          landed_blocks: list[int]) -> list[Mismatch]:
    """The receiver's check: each digest for a route in ``routes`` (those writing into this
    rank) against the bytes at ``landed_blocks[position]``; digests for other ranks are
    skipped."""
    if not routes:
        return []
    dst_rank = routes[0].dst_rank
    by_source = {route.src_rank: route for route in routes}
    mismatches = []
    for digest in digests:
        if digest.dst_rank != dst_rank:
            continue
        route = by_source.get(digest.src_rank)
        if (route is None or not 0 <= digest.position < len(landed_blocks)
                or not 0 <= digest.layer < region.geometry.num_layers):
            mismatches.append(Mismatch(digest, -1, None))
            continue
        block = landed_blocks[digest.position]
        crc = region.digest(digest.layer, block, route.dst_local, route.num_heads)
        if crc != digest.crc:
            mismatches.append(Mismatch(digest, block, crc))
    return mismatches


def pack(digests: list[BlockDigest]) -> bytes:
    """A notice's digests on the wire (its sender is the notice's): little-endian uint32
    (dst_rank, layer, position, crc) rows, 16 bytes a digest."""
    rows = [(d.dst_rank, d.layer, d.position, d.crc) for d in digests]
    return np.asarray(rows, dtype="<u4").reshape(-1, 4).tobytes()


def unpack(src_rank: int, packed: bytes) -> list[BlockDigest]:
    if len(packed) % 16:
        raise ValueError(f"{len(packed)} bytes of digests, not a multiple of 16")
    rows = np.frombuffer(packed, dtype="<u4").reshape(-1, 4).tolist()
    return [BlockDigest(src_rank, *row) for row in rows]
