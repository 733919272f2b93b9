"""Layout maps: which bytes of a prefill rank's KV go to which bytes of a decode rank's.

Pure functions, no tensors. A pool (or a staging area, or a send buffer: same layout) holds,
per layer and for K then V, ``[num_blocks, num_kv_heads_local, block_size, head_dim]`` data
and, on an fp8 wire, ``[num_blocks, num_kv_heads_local, block_size]`` float32 scales::

    data   [layer][K|V][block][head][token][dim]     one (block, head range) is contiguous
    scales [layer][K|V][block][head][token]

KV heads split evenly across tensor-parallel ranks, or are replicated when there are fewer
heads than ranks (``engine.parallel.kv_head_range``). A *route* says which contiguous head
range a source rank writes into a destination rank; every head a destination rank holds
comes from exactly one source rank (when the source replicates a head, the destination's
rank number picks the replica, so replicas share the load).

A transfer moves, per layer, one *descriptor* per (tensor, K|V, block): the route's head
range of that block. Consecutive descriptors that are contiguous on both sides coalesce into
one segment (NIXL merges them the same way when it builds the request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from engine.parallel import kv_head_range

SCALE_BYTES = 4  # float32 scale per token per head on an fp8 wire
DATA, SCALES = 0, 1  # the two tensors of a region


def check_tp(num_kv_heads: int, tp_size: int, field: str) -> None:
    if tp_size < 1 or (num_kv_heads % tp_size and tp_size % num_kv_heads):
        raise ValueError(f"{field}={tp_size} neither divides nor is a multiple of "
                         f"num_key_value_heads={num_kv_heads}")


@dataclass(frozen=True, slots=True)
class RegionGeometry:
    """Shape of one registered KV region (a pool, a staging area or a send buffer)."""

    num_layers: int
    num_blocks: int
    num_kv_heads: int  # local to the rank
    block_size: int
    head_dim: int
    element_size: int  # bytes per data element
    has_scales: bool

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "num_kv_heads", "block_size", "head_dim",
                     "element_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_bytes(self) -> tuple[int, int]:
        """Bytes of one head of one block: (data, scales)."""
        data = self.block_size * self.head_dim * self.element_size
        return data, (self.block_size * SCALE_BYTES if self.has_scales else 0)

    @property
    def num_tensors(self) -> int:
        return 2 if self.has_scales else 1

    @property
    def tensor_bytes(self) -> tuple[int, int]:
        """Total bytes of (data, scales), for registration."""
        per_head = self.head_bytes
        rows = self.num_layers * 2 * self.num_blocks * self.num_kv_heads
        return rows * per_head[0], rows * per_head[1]

    def offset(self, tensor: int, layer: int, kv: int, block: int, head: int) -> int:
        """Byte offset of (layer, K|V, block, local head) inside ``tensor``."""
        row = ((layer * 2 + kv) * self.num_blocks + block) * self.num_kv_heads + head
        return row * self.head_bytes[tensor]


class HeadRoute(NamedTuple):
    """Heads ``[first_head, first_head + num_heads)`` (global ids) go from ``src_rank``,
    where they start at local head ``src_local``, to ``dst_rank`` at ``dst_local``."""

    src_rank: int
    dst_rank: int
    first_head: int
    num_heads: int
    src_local: int
    dst_local: int


def head_routes(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadRoute]:
    """Every route from a source TP group to a destination TP group, by (dst, src) rank."""
    check_tp(num_kv_heads, src_tp, "source tensor_parallel_size")
    check_tp(num_kv_heads, dst_tp, "destination tensor_parallel_size")
    routes = []
    for dst_rank in range(dst_tp):
        dst_first, dst_count = kv_head_range(num_kv_heads, dst_rank, dst_tp)
        by_source: dict[int, list[int]] = {}
        for head in range(dst_first, dst_first + dst_count):
            by_source.setdefault(_source_of(head, num_kv_heads, src_tp, dst_rank), []).append(head)
        for src_rank, heads in sorted(by_source.items()):
            src_first, _ = kv_head_range(num_kv_heads, src_rank, src_tp)
            routes.append(HeadRoute(src_rank, dst_rank, heads[0], len(heads),
                                    heads[0] - src_first, heads[0] - dst_first))
    return routes


def _source_of(head: int, num_kv_heads: int, src_tp: int, dst_rank: int) -> int:
    """The source rank a destination rank reads ``head`` from."""
    if num_kv_heads >= src_tp:
        return head // (num_kv_heads // src_tp)
    replicas = src_tp // num_kv_heads  # ranks head*replicas ... hold this head
    return head * replicas + dst_rank % replicas


def routes_from(routes: list[HeadRoute], src_rank: int) -> dict[int, HeadRoute]:
    """The routes a source rank writes, by destination rank (at most one per destination)."""
    return {r.dst_rank: r for r in routes if r.src_rank == src_rank}


def senders(routes: list[HeadRoute]) -> list[int]:
    """Source ranks with something to write: each sends one completion notice per request."""
    return sorted({r.src_rank for r in routes})


def writes_into(routes: list[HeadRoute], dst_rank: int) -> list[HeadRoute]:
    """What a destination rank receives: one route per source rank that writes into it."""
    return [r for r in routes if r.dst_rank == dst_rank]


def descriptor_index(geometry: RegionGeometry, tensor: int, layer: int, kv: int,
                     block: int) -> int:
    """Position of (tensor, layer, K|V, block) in ``descriptor_array``."""
    return ((tensor * geometry.num_layers + layer) * 2 + kv) * geometry.num_blocks + block


def layer_indices(geometry: RegionGeometry, layer: int, blocks: list[int]) -> list[int]:
    """Descriptor indices for one layer's blocks, in posting order: tensor, K|V, block."""
    if not 0 <= layer < geometry.num_layers:
        raise ValueError(f"layer {layer} outside [0, {geometry.num_layers})")
    for block in blocks:
        if not 0 <= block < geometry.num_blocks:
            raise ValueError(f"block id {block} outside [0, {geometry.num_blocks})")
    return [descriptor_index(geometry, tensor, layer, kv, block)
            for tensor in range(geometry.num_tensors) for kv in range(2) for block in blocks]


class Segment(NamedTuple):
    """Bytes to move: ``num_bytes`` from ``src_offset`` to ``dst_offset`` of ``tensor``."""

    tensor: int
    src_offset: int
    dst_offset: int
    num_bytes: int


def layer_segments(route: HeadRoute, src: RegionGeometry, dst: RegionGeometry, layer: int,
                   src_blocks: list[int], dst_blocks: list[int]) -> list[Segment]:
    """The coalesced byte ranges one layer of a route moves for these blocks."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination")
    if src.has_scales != dst.has_scales or src.head_bytes != dst.head_bytes:
        raise ValueError(f"source region {src} and destination region {dst} differ in wire "
                         "layout")
    src_table = descriptor_array(src, route.src_local, route.num_heads)
    dst_table = descriptor_array(dst, route.dst_local, route.num_heads)
    pieces = [Segment(int(src_table[s, 0]), int(src_table[s, 1]), int(dst_table[d, 1]),
                      int(src_table[s, 2]))
              for s, d in zip(layer_indices(src, layer, src_blocks),
                              layer_indices(dst, layer, dst_blocks), strict=True)]
    return coalesce(pieces)


def coalesce(pieces: list[Segment]) -> list[Segment]:
    """Merge consecutive segments that are contiguous on both sides."""
    merged: list[Segment] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if (last is not None and last.tensor == piece.tensor
                and last.src_offset + last.num_bytes == piece.src_offset
                and last.dst_offset + last.num_bytes == piece.dst_offset):
            merged[-1] = last._replace(num_bytes=last.num_bytes + piece.num_bytes)
        else:
            merged.append(piece)
    return merged


def descriptor_array(geometry: RegionGeometry, first_head: int,
                     num_heads: int) -> np.ndarray:
    """One descriptor per (tensor, layer, K|V, block), ``num_heads`` local heads from
    ``first_head``, as an ``[N, 3]`` int64 array (tensor, offset, num_bytes): built once
    per peer, indexed with ``layer_indices``, without a Python loop (a large pool has
    millions of descriptors)."""
    if first_head < 0 or first_head + num_heads > geometry.num_kv_heads:
        raise ValueError(f"heads [{first_head}, {first_head + num_heads}) outside the "
                         f"region's {geometry.num_kv_heads} heads")
    rows_per_tensor = geometry.num_layers * 2 * geometry.num_blocks
    parts = []
    for tensor in range(geometry.num_tensors):
        head_bytes = geometry.head_bytes[tensor]
        rows = np.arange(rows_per_tensor, dtype=np.int64)  # (layer, K|V, block) flattened
        part = np.empty((rows_per_tensor, 3), dtype=np.int64)
        part[:, 0] = tensor
        part[:, 1] = (rows * geometry.num_kv_heads + first_head) * head_bytes
        part[:, 2] = num_heads * head_bytes
        parts.append(part)
    return np.concatenate(parts)
