"""kvtransfer.layout: head routes between TP groups and the byte ranges a transfer moves.

The reference check builds real pools as torch tensors, applies every route's segments as raw
byte copies and compares each destination pool with plain tensor indexing of the full KV.
"""

from __future__ import annotations

import pytest
import torch

from engine.parallel import kv_head_range
from kvtransfer.layout import (
    DATA,
    SCALES,
    HeadRoute,
    RegionGeometry,
    Segment,
    coalesce,
    head_routes,
    layer_indices,
    layer_segments,
    routes_from,
    senders,
    writes_into,
)

L, SRC_NB, DST_NB, BS, D = 2, 6, 7, 2, 3
TPS = (1, 2, 4, 8)
SWEEP = [(h, s, d) for h in (1, 2, 4) for s in TPS for d in TPS
         if (h % s == 0 or s % h == 0) and (h % d == 0 or d % h == 0)]
# (source blocks, destination blocks, layers moved)
BLOCK_CASES = [
    ([1, 2, 3], [4, 5, 6], (0, 1)),  # adjacent runs
    ([0, 5, 2], [3, 0, 6], (0, 1)),  # non-adjacent
    ([3, 2, 1], [1, 2, 3], (0, 1)),  # reversed
    ([], [], (0, 1)),  # nothing
    ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], (0, 1)),  # every source block
    ([4, 0], [6, 2], (1,)),  # one layer only: layer 0 must stay zero
]


def geometry(num_blocks: int, heads: int, element_size: int, scales: bool) -> RegionGeometry:
    return RegionGeometry(L, num_blocks, heads, BS, D, element_size, scales)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).view(-1)


def full_kv(h: int, element_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random nonzero KV for all heads: data [L, 2, NB, H, bs, D], scales [L, 2, NB, H, bs]."""
    gen = torch.Generator().manual_seed(1234 + h * 10 + element_size)
    shape = (L, 2, SRC_NB, h, BS, D)
    if element_size == 1:
        data = torch.randint(1, 256, shape, dtype=torch.uint8, generator=gen)
    else:
        data = torch.rand(shape, generator=gen) + 1.0
    return data, torch.rand(shape[:-1], generator=gen) + 1.0


def empty_pool(heads: int, element_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.uint8 if element_size == 1 else torch.float32
    return (torch.zeros((L, 2, DST_NB, heads, BS, D), dtype=dtype),
            torch.zeros((L, 2, DST_NB, heads, BS), dtype=torch.float32))


def copy_segments(segments: list[Segment], src: tuple, dst: tuple) -> None:
    for seg in segments:
        src_bytes, dst_bytes = as_bytes(src[seg.tensor]), as_bytes(dst[seg.tensor])
        dst_bytes[seg.dst_offset:seg.dst_offset + seg.num_bytes] = \
            src_bytes[seg.src_offset:seg.src_offset + seg.num_bytes]


def expected_pool(full: torch.Tensor, shape: tuple, first: int, count: int,
                  src_blocks: list[int], dst_blocks: list[int], layers: tuple) -> torch.Tensor:
    out = torch.zeros(shape, dtype=full.dtype)
    sb, db = torch.tensor(src_blocks, dtype=torch.long), torch.tensor(dst_blocks, dtype=torch.long)
    for layer in layers:
        out[layer][:, db] = full[layer][:, sb, first:first + count]
    return out


@pytest.mark.parametrize("element_size", [4, 1])
@pytest.mark.parametrize("scales", [False, True])
@pytest.mark.parametrize(("h", "src_tp", "dst_tp"), SWEEP)
def test_segments_match_reference(h: int, src_tp: int, dst_tp: int, scales: bool,
                                  element_size: int) -> None:
    routes = head_routes(h, src_tp, dst_tp)
    data, scale = full_kv(h, element_size)
    src_heads = [kv_head_range(h, r, src_tp) for r in range(src_tp)]
    dst_heads = [kv_head_range(h, r, dst_tp) for r in range(dst_tp)]
    src_pools = [(data[:, :, :, f:f + n].contiguous(), scale[:, :, :, f:f + n].contiguous())
                 for f, n in src_heads]
    src_geo = [geometry(SRC_NB, n, element_size, scales) for _, n in src_heads]
    dst_geo = [geometry(DST_NB, n, element_size, scales) for _, n in dst_heads]

    for dst_rank, (first, count) in enumerate(dst_heads):
        covered = []
        for route in writes_into(routes, dst_rank):
            src_first, src_count = src_heads[route.src_rank]
            assert route.src_local == route.first_head - src_first
            assert route.dst_local == route.first_head - first
            assert 0 <= route.src_local and route.src_local + route.num_heads <= src_count
            covered += range(route.first_head, route.first_head + route.num_heads)
        assert sorted(covered) == list(range(first, first + count))

    for src_blocks, dst_blocks, layers in BLOCK_CASES:
        dst_pools = [empty_pool(n, element_size) for _, n in dst_heads]
        for route in routes:
            for layer in layers:
                segments = layer_segments(route, src_geo[route.src_rank],
                                          dst_geo[route.dst_rank], layer, src_blocks, dst_blocks)
                assert all(s.tensor in ((DATA, SCALES) if scales else (DATA,)) for s in segments)
                copy_segments(segments, src_pools[route.src_rank], dst_pools[route.dst_rank])
        for (first, count), (dst_data, dst_scales) in zip(dst_heads, dst_pools, strict=True):
            ref = expected_pool(data, dst_data.shape, first, count, src_blocks, dst_blocks,
                                layers)
            assert torch.equal(dst_data, ref)
            ref = expected_pool(scale, dst_scales.shape, first, count, src_blocks, dst_blocks,
                                layers if scales else ())
            assert torch.equal(dst_scales, ref)


def test_routes_replicated_source_to_fewer_ranks() -> None:
    # H=2 over 4 source ranks: ranks 0,1 hold head 0, ranks 2,3 hold head 1.
    assert head_routes(2, 4, 2) == [HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(3, 1, 1, 1, 0, 0)]
    assert head_routes(2, 4, 1) == [HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(2, 0, 1, 1, 0, 1)]
    assert head_routes(1, 2, 2) == [HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(1, 1, 0, 1, 0, 0)]
    assert head_routes(2, 4, 4) == [HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(1, 1, 0, 1, 0, 0),
                                    HeadRoute(2, 2, 1, 1, 0, 0), HeadRoute(3, 3, 1, 1, 0, 0)]
    assert head_routes(1, 8, 2) == [HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(1, 1, 0, 1, 0, 0)]


@pytest.mark.parametrize(("h", "src_tp", "dst_tp"), [c for c in SWEEP if c[1] > c[0]])
def test_replicas_share_the_load(h: int, src_tp: int, dst_tp: int) -> None:
    """Destination ranks reading one head spread over its source replicas evenly."""
    routes = head_routes(h, src_tp, dst_tp)
    replicas = src_tp // h
    for head in range(h):
        load = dict.fromkeys(range(head * replicas, (head + 1) * replicas), 0)
        for r in routes:
            if r.first_head <= head < r.first_head + r.num_heads:
                load[r.src_rank] += 1  # KeyError if read from a rank without the head
        assert max(load.values()) - min(load.values()) <= 1


def segment_bytes(blocks: int, heads: int, element_size: int, scales: bool) -> int:
    return blocks * 2 * heads * (BS * D * element_size + (BS * 4 if scales else 0))


def one_route_segments(h: int, src_tp: int, dst_tp: int, scales: bool, src_blocks: list[int],
                       dst_blocks: list[int], layer: int = 1) -> tuple[HeadRoute, list[Segment]]:
    route = head_routes(h, src_tp, dst_tp)[0]
    src = geometry(SRC_NB, kv_head_range(h, route.src_rank, src_tp)[1], 4, scales)
    dst = geometry(DST_NB, kv_head_range(h, route.dst_rank, dst_tp)[1], 4, scales)
    return route, layer_segments(route, src, dst, layer, src_blocks, dst_blocks)


@pytest.mark.parametrize("scales", [False, True])
@pytest.mark.parametrize(("h", "tp"), [(4, 1), (4, 2), (4, 4), (1, 2), (2, 8)])
def test_full_heads_coalesce(h: int, tp: int, scales: bool) -> None:
    route, segs = one_route_segments(h, tp, tp, scales, [2, 3, 4], [0, 1, 2])
    assert len(segs) == (4 if scales else 2)
    assert [s.tensor for s in segs] == ([DATA, DATA, SCALES, SCALES] if scales else [DATA, DATA])
    assert sum(s.num_bytes for s in segs) == segment_bytes(3, route.num_heads, 4, scales)

    _, segs = one_route_segments(h, tp, tp, scales, [0, 2, 4], [1, 3, 5])
    assert len(segs) == 3 * (4 if scales else 2)
    _, segs = one_route_segments(h, tp, tp, scales, [1, 2], [3, 5])  # adjacent on one side
    assert len(segs) == 2 * (4 if scales else 2)


def test_coalesced_segments_exact() -> None:
    src, dst = geometry(SRC_NB, 4, 4, True), geometry(DST_NB, 4, 4, True)
    route = head_routes(4, 1, 1)[0]
    assert route == HeadRoute(0, 0, 0, 4, 0, 0)
    data, scale = BS * D * 4 * 4, BS * 4 * 4  # one block, all 4 heads
    expected = [Segment(t, src.offset(t, 1, kv, 2, 0), dst.offset(t, 1, kv, 0, 0), 3 * n)
                for t, n in ((DATA, data), (SCALES, scale)) for kv in (0, 1)]
    assert layer_segments(route, src, dst, 1, [2, 3, 4], [0, 1, 2]) == expected
    # layer 1, K: rows ((1*2+0)*NB + block) * 4 heads
    assert expected[0] == Segment(DATA, (2 * SRC_NB + 2) * 4 * data // 4,
                                  2 * DST_NB * 4 * data // 4, 3 * data)


@pytest.mark.parametrize("scales", [False, True])
@pytest.mark.parametrize(("h", "src_tp", "dst_tp"), [(4, 1, 2), (4, 2, 1), (4, 2, 4), (2, 1, 2)])
def test_head_subset_never_coalesces(h: int, src_tp: int, dst_tp: int, scales: bool) -> None:
    route, segs = one_route_segments(h, src_tp, dst_tp, scales, [2, 3, 4], [0, 1, 2])
    assert len(segs) == 3 * 2 * (2 if scales else 1)
    assert sum(s.num_bytes for s in segs) == segment_bytes(3, route.num_heads, 4, scales)
    assert all(s.num_bytes == route.num_heads * (BS * D * 4 if s.tensor == DATA else BS * 4)
               for s in segs)


def test_senders_routes_from_writes_into() -> None:
    routes = head_routes(4, 2, 4)
    assert routes == [HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(0, 1, 1, 1, 1, 0),
                      HeadRoute(1, 2, 2, 1, 0, 0), HeadRoute(1, 3, 3, 1, 1, 0)]
    assert senders(routes) == [0, 1]
    assert routes_from(routes, 0) == {0: routes[0], 1: routes[1]}
    assert routes_from(routes, 1) == {2: routes[2], 3: routes[3]}
    assert writes_into(routes, 2) == [HeadRoute(1, 2, 2, 1, 0, 0)]

    routes = head_routes(4, 4, 1)
    assert routes == [HeadRoute(s, 0, s, 1, 0, s) for s in range(4)]
    assert senders(routes) == [0, 1, 2, 3]
    assert writes_into(routes, 0) == routes
    assert routes_from(routes, 2) == {0: HeadRoute(2, 0, 2, 1, 0, 2)}

    routes = head_routes(2, 4, 1)
    assert senders(routes) == [0, 2]
    assert routes_from(routes, 1) == {}
    assert routes_from(routes, 2) == {0: HeadRoute(2, 0, 1, 1, 0, 1)}

    routes = head_routes(4, 1, 2)
    assert routes == [HeadRoute(0, 0, 0, 2, 0, 0), HeadRoute(0, 1, 2, 2, 2, 0)]
    assert senders(routes) == [0]
    assert routes_from(routes, 0) == {0: routes[0], 1: routes[1]}
    assert writes_into(routes, 1) == [routes[1]]

    routes = head_routes(1, 8, 2)
    assert senders(routes) == [0, 1]
    assert writes_into(routes, 1) == [HeadRoute(1, 1, 0, 1, 0, 0)]


def test_coalesce_needs_same_tensor_and_both_sides_contiguous() -> None:
    a = Segment(DATA, 0, 8, 4)
    assert coalesce([a, Segment(DATA, 4, 12, 4)]) == [Segment(DATA, 0, 8, 8)]
    assert coalesce([a, Segment(SCALES, 4, 12, 4)]) == [a, Segment(SCALES, 4, 12, 4)]
    assert coalesce([a, Segment(DATA, 4, 16, 4)]) == [a, Segment(DATA, 4, 16, 4)]
    assert coalesce([a, Segment(DATA, 8, 12, 4)]) == [a, Segment(DATA, 8, 12, 4)]
    assert coalesce([]) == []


def test_errors() -> None:
    with pytest.raises(ValueError, match="source tensor_parallel_size"):
        head_routes(4, 3, 1)
    with pytest.raises(ValueError, match="destination tensor_parallel_size"):
        head_routes(4, 1, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        head_routes(4, 0, 1)
    geo = geometry(SRC_NB, 2, 4, True)
    for bad in (SRC_NB, -1):
        with pytest.raises(ValueError, match="block id"):
            layer_indices(geo, 0, [0, bad])
    route = HeadRoute(0, 0, 0, 2, 0, 0)
    with pytest.raises(ValueError, match="source blocks"):
        layer_segments(route, geo, geo, 0, [0, 1], [0])
    with pytest.raises(ValueError, match="wire layout"):
        layer_segments(route, geo, geometry(SRC_NB, 2, 4, False), 0, [0], [0])
    with pytest.raises(ValueError, match="num_blocks"):
        RegionGeometry(L, 0, 2, BS, D, 4, False)


def test_layer_out_of_range_is_refused() -> None:
    geometry = RegionGeometry(2, 6, 2, 2, 3, 4, True)
    for layer in (2, -1):
        with pytest.raises(ValueError, match="layer"):
            layer_indices(geometry, layer, [0])
