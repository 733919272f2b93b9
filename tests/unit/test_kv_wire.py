"""The wire rules, slots, endpoints and notices: pure parts of the KV plane."""

from __future__ import annotations

import msgpack
import pytest
import torch

from engine.kv_cache import KVCache
from kvtransfer.checksum import BlockDigest
from kvtransfer.endpoint import NOTICE_VERSION, Endpoint, Notice, NoticeKind, WireRegion
from kvtransfer.layout import RegionGeometry
from kvtransfer.wire import SlotPool, Source, Target, check_wire, source_of, target_of
from pdserve.config import lands_in_staging


@pytest.mark.parametrize("prefill,decode", [("fp8", "fp8"), ("fp8", "auto"), ("auto", "fp8"),
                                            ("auto", "auto")])
def test_fp8_wire_takes_any_pools(prefill, decode):
    check_wire("fp8", prefill, decode)


@pytest.mark.parametrize("prefill,decode,path", [("fp8", "auto", "prefill.kv_cache_dtype"),
                                                 ("auto", "fp8", "decode.kv_cache_dtype")])
def test_lossless_wire_refuses_an_fp8_pool(prefill, decode, path):
    with pytest.raises(ValueError, match=f"^{path}: 'fp8' is invalid, must be 'auto' when "):
        check_wire("auto", prefill, decode)


def test_unknown_dtypes_are_named():
    with pytest.raises(ValueError) as error:
        check_wire("int8", "auto", "auto")
    assert str(error.value) == ("kv_transfer_dtype: 'int8' is invalid, "
                                "must be one of ('fp8', 'auto')")
    with pytest.raises(ValueError) as error:
        check_wire("fp8", "auto", "bf16")
    assert str(error.value) == ("decode.kv_cache_dtype: 'bf16' is invalid, "
                                "must be one of ('auto', 'fp8')")


@pytest.mark.parametrize("wire,pool,source,target", [
    ("fp8", "auto", Source.SEND_BUFFER, Target.STAGING),
    ("fp8", "fp8", Source.POOL, Target.POOL),
    ("auto", "auto", Source.POOL, Target.POOL),
])
def test_where_bytes_come_from_and_land(wire, pool, source, target):
    assert source_of(wire, pool) is source and target_of(wire, pool) is target
    assert lands_in_staging(wire, pool) is (target is Target.STAGING)


def test_slots_lowest_first_and_none_when_short():
    slots = SlotPool(4)
    assert slots.allocate(3) == [0, 1, 2]
    assert slots.allocate(2) is None
    slots.free([1, 0])
    assert slots.allocate(3) == [0, 1, 3]
    with pytest.raises(RuntimeError, match="freed twice"):
        slots.free([2, 2])


def _pool(kv_cache_dtype: str) -> KVCache:
    return KVCache(2, 5, 2, 16, 8, torch.float32, kv_cache_dtype, "cpu")


def test_wire_region_is_the_pool_or_a_separate_fp8_area():
    fp8_pool = _pool("fp8")
    region = WireRegion(fp8_pool, "fp8", 3)
    assert region.is_pool and region.data is fp8_pool.data and region.slots is None
    region = WireRegion(_pool("auto"), "fp8", 3)
    assert not region.is_pool and region.data.dtype == torch.float8_e4m3fn
    assert region.geometry == RegionGeometry(2, 3, 2, 16, 8, 1, True)
    assert WireRegion(_pool("auto"), "auto", 3).geometry == RegionGeometry(2, 5, 2, 16, 8, 4,
                                                                          False)
    with pytest.raises(ValueError, match="kv_transfer_dtype='auto'"):
        WireRegion(fp8_pool, "auto", 3)


def test_endpoint_survives_msgpack():
    endpoint = WireRegion(_pool("fp8"), "fp8", 0).endpoint("decode-0", b"\x00md", 1, 2, 4)
    packed = msgpack.packb(endpoint.to_wire())
    assert Endpoint.from_wire(msgpack.unpackb(packed)) == endpoint


def test_endpoint_descriptors_address_the_tensors():
    pool = _pool("fp8")
    endpoint = WireRegion(pool, "fp8", 0).endpoint("d", b"", 0, 1, 2)
    rows = endpoint.descriptors(1, 1)
    head_bytes = 16 * 8  # block_size x head_dim fp8 bytes
    assert rows[0].tolist() == [pool.data.data_ptr() + head_bytes, head_bytes]
    scales_start = 2 * 2 * 5  # layers x K,V x blocks data descriptors come first
    assert rows[scales_start].tolist() == [pool.scales.data_ptr() + 16 * 4, 16 * 4]


def test_notice_roundtrip_and_version():
    notice = Notice(NoticeKind.CANCELLED, "req-1", 3, 1, 1024)
    assert Notice.decode(notice.encode()) == notice
    with pytest.raises(ValueError, match="version"):
        Notice.decode(msgpack.packb([99, "done", "r", 0, 0, 0]))
    with pytest.raises(ValueError, match="version"):  # a version-1 sender, without digests
        Notice.decode(msgpack.packb([1, "done", "r", 0, 0, 0]))


def test_notice_carries_its_senders_digests():
    digests = (BlockDigest(1, 0, 0, 2, 0xDEADBEEF), BlockDigest(1, 1, 8, 0, 7))
    notice = Notice(NoticeKind.DONE, "req-1", 3, 1, 1024, digests)
    assert Notice.decode(notice.encode()) == notice
    assert len(notice.encode()) - len(Notice(*notice[:5]).encode()) == 16 * len(digests)
    assert msgpack.unpackb(notice.encode())[0] == NOTICE_VERSION
