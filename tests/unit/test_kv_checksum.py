"""kvtransfer.checksum: digests of what a route wrote, checked where it landed.

Real regions as torch tensors, moved by the layout's byte segments as NIXL would move them,
for every TP pair of 1, 2 and 4 KV heads, on the fp8 wire (data and scales) and the lossless
one; then single flipped bytes, which exactly their block's digest must catch.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from engine.kv_cache import KVCache
from engine.parallel import kv_head_range
from kvtransfer.checksum import (
    SAMPLE_PERIOD,
    BlockDigest,
    Mismatch,
    RegionBytes,
    check,
    digest_route,
    pack,
    selected,
    unpack,
)
from kvtransfer.endpoint import WireRegion
from kvtransfer.layout import RegionGeometry, head_routes, layer_segments, writes_into
from pdserve.choices import KVChecksum

L, SRC_NB, DST_NB, BS, D = 3, 6, 7, 2, 3
TPS = (1, 2, 4, 8)
SWEEP = [(h, s, d) for h in (1, 2, 4) for s in TPS for d in TPS
         if (h % s == 0 or s % h == 0) and (h % d == 0 or d % h == 0)]
WIRE_BLOCKS, LANDED_BLOCKS = [4, 0, 5, 2], [1, 6, 3, 0]  # by position in the request
WIRES = {"fp8": (torch.float8_e4m3fn, True), "auto": (torch.float32, False)}


class Region:
    """One rank's wire region: data, scales (fp8 wire) and their byte views."""

    def __init__(self, num_blocks: int, heads: int, wire: str, generator=None):
        dtype, has_scales = WIRES[wire]
        shape = (L, 2, num_blocks, heads, BS, D)
        raw = (torch.randint(0, 256, (*shape[:-1], D * dtype.itemsize), dtype=torch.uint8,
                             generator=generator) if generator is not None
               else torch.zeros((*shape[:-1], D * dtype.itemsize), dtype=torch.uint8))
        self.data = raw.view(dtype)
        self.scales = None
        if has_scales:
            self.scales = (torch.rand(shape[:-1], generator=generator) if generator is not None
                           else torch.zeros(shape[:-1]))
        self.geometry = RegionGeometry(L, num_blocks, heads, BS, D, dtype.itemsize, has_scales)
        self.bytes = RegionBytes(self.data, self.scales, self.geometry)

    def tensor_bytes(self, tensor: int) -> torch.Tensor:
        return (self.data if tensor == 0 else self.scales).view(torch.uint8).view(-1)


def groups(h: int, src_tp: int, dst_tp: int, wire: str) -> tuple[list[Region], list[Region]]:
    generator = torch.Generator().manual_seed(h * 100 + src_tp * 10 + dst_tp)
    sources = [Region(SRC_NB, kv_head_range(h, r, src_tp)[1], wire, generator)
               for r in range(src_tp)]
    sinks = [Region(DST_NB, kv_head_range(h, r, dst_tp)[1], wire) for r in range(dst_tp)]
    return sources, sinks


def transfer(routes, sources: list[Region], sinks: list[Region]) -> list[BlockDigest]:
    """Move every layer along every route as raw byte copies; the senders' digests."""
    digests = []
    for route in routes:
        src, dst = sources[route.src_rank], sinks[route.dst_rank]
        for layer in range(L):
            for seg in layer_segments(route, src.geometry, dst.geometry, layer, WIRE_BLOCKS,
                                      LANDED_BLOCKS):
                dst.tensor_bytes(seg.tensor)[seg.dst_offset:seg.dst_offset + seg.num_bytes] = \
                    src.tensor_bytes(seg.tensor)[seg.src_offset:seg.src_offset + seg.num_bytes]
            digests += digest_route(src.bytes, route, layer, list(range(len(WIRE_BLOCKS))),
                                    WIRE_BLOCKS)
    return digests


def check_rank(routes, sinks: list[Region], rank: int, digests) -> list[Mismatch]:
    return check(sinks[rank].bytes, writes_into(routes, rank), digests, LANDED_BLOCKS)


@pytest.mark.parametrize("wire", list(WIRES))
@pytest.mark.parametrize(("h", "src_tp", "dst_tp"), SWEEP)
def test_every_route_lands_matching_and_one_flipped_byte_is_caught(h, src_tp, dst_tp, wire):
    routes = head_routes(h, src_tp, dst_tp)
    sources, sinks = groups(h, src_tp, dst_tp, wire)
    digests = transfer(routes, sources, sinks)
    assert len(digests) == len(routes) * L * len(WIRE_BLOCKS)
    assert len({(d.src_rank, d.dst_rank, d.layer, d.position) for d in digests}) == len(digests)
    for rank in range(dst_tp):
        assert check_rank(routes, sinks, rank, digests) == []

    for tensor in range(2 if WIRES[wire][1] else 1):  # data, then scales
        for route in routes:
            sink = sinks[route.dst_rank]
            position, layer = 2, L - 1
            block = LANDED_BLOCKS[position]
            kv = tensor  # K of the data, V of the scales: both halves are covered
            offset = sink.geometry.offset(tensor, layer, kv, block, route.dst_local)
            offset += route.num_heads * sink.geometry.head_bytes[tensor] - 1  # its last byte
            sink.tensor_bytes(tensor)[offset] ^= 0x01
            (mismatch,) = check_rank(routes, sinks, route.dst_rank, digests)
            assert mismatch.digest == BlockDigest(route.src_rank, route.dst_rank, layer,
                                                  position, mismatch.digest.crc)
            assert mismatch.block_id == block and mismatch.crc != mismatch.digest.crc
            for other in range(dst_tp):  # no other rank reads it
                assert other == route.dst_rank or check_rank(routes, sinks, other, digests) == []
            sink.tensor_bytes(tensor)[offset] ^= 0x01
            assert check_rank(routes, sinks, route.dst_rank, digests) == []


def test_bytes_outside_the_landed_blocks_and_heads_are_not_read():
    routes = head_routes(4, 1, 1)
    sources, sinks = groups(4, 1, 1, "fp8")
    digests = transfer(routes, sources, sinks)
    sinks[0].data.view(torch.uint8)[:, :, 2] ^= 0xFF  # block 2 received nothing
    assert check_rank(routes, sinks, 0, digests) == []
    # A route covering heads 1..2 of 4 does not read heads 0 and 3.
    (route,) = [r for r in head_routes(4, 1, 2) if r.dst_rank == 1]
    region = Region(DST_NB, 4, "fp8", torch.Generator().manual_seed(3))
    before = region.bytes.digest(0, 1, 1, 2)
    region.data.view(torch.uint8)[0, :, 1, [0, 3]] ^= 0xFF
    assert region.bytes.digest(0, 1, 1, 2) == before
    region.data.view(torch.uint8)[0, 1, 1, 2] ^= 0x01
    assert region.bytes.digest(0, 1, 1, 2) != before
    assert route.num_heads == 2


def test_a_digest_naming_nothing_this_rank_received_is_a_mismatch():
    routes = head_routes(2, 2, 1)  # sources 0 and 1 into rank 0
    sinks = [Region(DST_NB, 2, "auto")]
    bad = [BlockDigest(3, 0, 0, 0, 0), BlockDigest(0, 0, 0, len(LANDED_BLOCKS), 0),
           BlockDigest(0, 0, L, 0, 0)]
    assert check_rank(routes, sinks, 0, bad) == [Mismatch(d, -1, None) for d in bad]
    assert check_rank(routes, sinks, 0, [BlockDigest(0, 1, 0, 0, 0)]) == []  # rank 1's


@pytest.mark.parametrize("pool", ["auto", "fp8"])
def test_the_digest_reads_the_wire_bytes_staging_before_dequantizing(pool):
    kv_cache = KVCache(L, 5, 2, BS, D, torch.float32, pool, "cpu")
    region = WireRegion(kv_cache, "fp8", 4)  # auto pool: fp8 staging; fp8 pool: the pool
    region.data.view(torch.uint8).copy_(torch.randint(0, 256, region.data.shape,
                                                      dtype=torch.uint8))
    wire = RegionBytes(region.data, region.scales, region.geometry)
    before = wire.digest(1, 3, 0, 2)
    if pool == "auto":  # the dequantized pool is no wire byte
        kv_cache.data[1, :, 3] += 1.0
        assert wire.digest(1, 3, 0, 2) == before
    region.scales[1, 1, 3, 1, 0] += 1.0  # V's scale, head 1, token 0
    assert wire.digest(1, 3, 0, 2) != before


def test_off_selects_nothing_and_all_everything():
    for layer in range(L):
        assert selected(KVChecksum.OFF, "r", layer, range(0, 9), L, 9) == []
        assert selected(KVChecksum.ALL, "r", layer, range(3, 7), L, 9) == [3, 4, 5, 6]


def _sampled(request_id: str, num_layers: int, num_blocks: int, chunks: list[int]):
    """Every (layer, position) ``sample`` picks when the sends come in these chunks."""
    picked, start = [], 0
    for count in chunks:
        for layer in range(num_layers):
            picked += [(layer, p) for p in selected(KVChecksum.SAMPLE, request_id, layer,
                                                    range(start, start + count), num_layers,
                                                    num_blocks)]
        start += count
    assert start == num_blocks
    return sorted(picked)


def test_sample_is_a_fixed_sixteenth_and_the_last_block_whatever_the_chunks():
    num_layers, num_blocks = 9, 64
    phase = zlib.crc32(b"req-7") % SAMPLE_PERIOD
    expected = sorted({(layer, p) for layer in range(num_layers) for p in range(num_blocks)
                       if (layer * num_blocks + p) % SAMPLE_PERIOD == phase}
                      | {(num_layers - 1, num_blocks - 1)})
    assert _sampled("req-7", num_layers, num_blocks, [num_blocks]) == expected
    assert _sampled("req-7", num_layers, num_blocks, [5, 1, 30, 28]) == expected
    assert num_layers * num_blocks // SAMPLE_PERIOD <= len(expected) <= \
        num_layers * num_blocks // SAMPLE_PERIOD + 1
    assert len({layer for layer, _ in expected}) == num_layers  # every layer is sampled
    phases = {zlib.crc32(f"req-{i}".encode()) % SAMPLE_PERIOD for i in range(64)}
    assert len(phases) > 8  # requests sample different blocks


def test_sample_of_a_one_block_request_checks_it():
    phase = zlib.crc32(b"x") % SAMPLE_PERIOD
    assert _sampled("x", 2, 1, [1]) == sorted({(1, 0)} | {(layer, 0) for layer in range(2)
                                                          if layer == phase})


def test_pack_round_trip_and_bad_length():
    digests = [BlockDigest(2, 0, 8, 63, 0xFFFFFFFF), BlockDigest(2, 3, 0, 0, 0)]
    packed = pack(digests)
    assert len(packed) == 16 * len(digests)
    assert unpack(2, packed) == digests
    assert pack([]) == b"" and unpack(0, b"") == []
    with pytest.raises(ValueError, match="multiple of 16"):
        unpack(0, packed[:-1])
