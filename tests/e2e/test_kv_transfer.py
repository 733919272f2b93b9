"""The KV plane end to end: real NIXL agents in two processes, KV computed by the engine.

The prefill process computes a prompt's KV (all but its last token, as the prefill side
does) and streams it layer by layer as each layer finishes; the decode process holds bare
pools. Every test starts from fresh agents (new names) in the same two processes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.parallel import kv_head_range
from kvtransfer.layout import head_routes
from tests.e2e.kv_host import Host

TIMEOUT_S = 60.0
PROMPT = [7, 99, 3, 250, 18, 41, 77, 5, 301, 12, 64, 200, 9, 33, 150, 2, 88, 401, 17, 6,
          120, 45, 310, 27, 73, 81, 19, 230, 54, 11, 140, 36, 402, 23, 61]  # 35 tokens
SRC_BLOCKS = [4, 1, 2]  # 35 - 1 tokens need 3 blocks of 16
DST_BLOCKS = [9, 10, 11]
_names = itertools.count()


@pytest.fixture(scope="module")
def hosts():
    prefill, decode = Host(), Host()
    yield prefill, decode
    prefill.close()
    decode.close()


def _connect(hosts, model_dir, prefill_dtype, decode_dtype, wire, src_tp=1, dst_tp=1,
             checksum="off"):
    prefill, decode = hosts
    prefill.call("reset")
    decode.call("reset")
    run = next(_names)
    sources = prefill.call("setup_prefill", str(model_dir), prefill_dtype, wire, src_tp, 16,
                           f"prefill{run}", checksum)
    sinks = decode.call("setup_decode", str(model_dir), decode_dtype, wire, dst_tp, 16, 8,
                        f"decode{run}")
    prefill.call("add_peers", sinks)
    decode.call("add_peers", sources)
    return [s["agent_name"] for s in sources], [s["agent_name"] for s in sinks]


def _transfer(hosts, sources, sinks, request_id="r1", attempt=0):
    prefill, decode = hosts
    targets = decode.call("expect", request_id, attempt, DST_BLOCKS, sources, TIMEOUT_S)
    results = prefill.call("prefill_and_send", request_id, attempt, PROMPT[:-1], SRC_BLOCKS,
                           sinks, targets, TIMEOUT_S)
    assert all(ok for _, _, ok, _, _ in results), results
    assert decode.call("wait_events", 1) == [(request_id, attempt, "landed", "")]
    decode.call("finish", request_id, True)
    return results


def _assert_nothing_held(host, num_handles):
    counts = host.call("counts")
    assert counts["handles"] == num_handles, counts
    assert all(free in (None, 8) for free in counts["free_send"] + counts["free_staging"])
    assert counts["expected"] == [0] * len(counts["expected"])


def test_auto_wire_lands_bit_exact(hosts, tiny_llama_dir):
    sources, sinks = _connect(hosts, tiny_llama_dir, "auto", "auto", "auto")
    results = _transfer(hosts, sources, sinks)
    (src_data, _), = hosts[0].call("pools", "producers")
    (dst_data, _), = hosts[1].call("pools", "consumers")
    assert torch.equal(dst_data[:, :, DST_BLOCKS], src_data[:, :, SRC_BLOCKS])
    assert dst_data[:, :, DST_BLOCKS].abs().sum() > 0  # the KV really was computed
    others = [b for b in range(16) if b not in DST_BLOCKS]
    assert dst_data[:, :, others].abs().sum() == 0
    # layers 2 x K,V 2 x heads 2 x 3 blocks x 16 tokens x head_dim 16 x 4 bytes
    assert results[0][4] == 2 * 2 * 2 * 3 * 16 * 16 * 4
    # Only the two descriptor lists prepared per peer remain, on each side of the transfer.
    _assert_nothing_held(hosts[0], [2])
    _assert_nothing_held(hosts[1], [0])


def test_fp8_pools_land_bit_exact_with_their_scales(hosts, tiny_llama_dir):
    sources, sinks = _connect(hosts, tiny_llama_dir, "fp8", "fp8", "fp8")
    results = _transfer(hosts, sources, sinks)
    (src_data, src_scales), = hosts[0].call("pools", "producers")
    (dst_data, dst_scales), = hosts[1].call("pools", "consumers")
    assert torch.equal(dst_data[:, :, DST_BLOCKS].view(torch.uint8),
                       src_data[:, :, SRC_BLOCKS].view(torch.uint8))
    assert torch.equal(dst_scales[:, :, DST_BLOCKS], src_scales[:, :, SRC_BLOCKS])
    # per token per head: head_dim fp8 bytes + a 4-byte scale
    assert results[0][4] == 2 * 2 * 2 * 3 * 16 * (16 * 1 + 4)


def test_fp8_wire_between_model_dtype_pools_stays_within_fp8_error(hosts, tiny_llama_dir):
    """The send buffer quantizes, staging dequantizes on arrival.

    Bound, derived from float8_e4m3fn with a scale s = amax/448 per token per head: a value
    x/s in the normal range rounds with relative error <= 2^-4 (3 mantissa bits, half an
    ulp); below 2^-6 (subnormal) the absolute error is <= 2^-10 in scaled units. So every
    element obeys |x' - x| <= 2^-4 |x| + 2^-10 s, and per layer ||x' - x|| / ||x|| <=
    2^-4 + 2^-10 sqrt(head_dim) / 448 (as s <= ||row|| / 448).
    """
    sources, sinks = _connect(hosts, tiny_llama_dir, "auto", "auto", "fp8")
    _transfer(hosts, sources, sinks)
    (src_data, _), = hosts[0].call("pools", "producers")
    (dst_data, _), = hosts[1].call("pools", "consumers")
    exact, landed = src_data[:, :, SRC_BLOCKS], dst_data[:, :, DST_BLOCKS]
    scale = exact.abs().amax(dim=-1, keepdim=True) / 448
    assert ((landed - exact).abs() <= exact.abs() / 16 + scale / 1024 + 1e-12).all()
    head_dim = exact.shape[-1]
    for layer in range(exact.shape[0]):
        for kv in range(2):
            error = (landed[layer, kv] - exact[layer, kv]).norm() / exact[layer, kv].norm()
            assert 0 < error <= 2**-4 + 2**-10 * head_dim**0.5 / 448
    _assert_nothing_held(hosts[0], [2])
    _assert_nothing_held(hosts[1], [0])


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 2), (2, 1), (2, 2), (4, 1), (1, 4), (4, 2)])
def test_tensor_parallel_layouts_give_the_tp1_kv(hosts, tiny_llama_dir, src_tp, dst_tp):
    """TP1 -> TP2, TP2 -> TP1 and replicated heads (2 KV heads over 4 ranks)."""
    sources, sinks = _connect(hosts, tiny_llama_dir, "auto", "auto", "auto", src_tp, dst_tp)
    _transfer(hosts, sources, sinks)
    # What TP1 -> TP1 delivers: the computed KV itself (test_auto_wire_lands_bit_exact).
    reference = hosts[0].call("computed_kv")[:, :, SRC_BLOCKS]
    for rank, (data, _) in enumerate(hosts[1].call("pools", "consumers")):
        first, count = kv_head_range(2, rank, dst_tp)
        assert torch.equal(data[:, :, DST_BLOCKS], reference[:, :, :, first:first + count])


@pytest.mark.parametrize("pools,src_tp,dst_tp,checksum", [
    ("auto", 1, 2, "all"),  # send buffer -> staging, checked before dequantizing
    ("fp8", 2, 1, "all"),  # pool -> pool, two senders into one rank
    ("auto", 1, 2, "off"),  # nothing computed, sent or caught
])
def test_digests_match_over_nixl_and_catch_a_flipped_byte(hosts, tiny_llama_dir, pools,
                                                          src_tp, dst_tp, checksum):
    sources, sinks = _connect(hosts, tiny_llama_dir, pools, pools, "fp8", src_tp, dst_tp,
                              checksum)
    prefill, decode = hosts
    targets = decode.call("expect", "r1", 0, DST_BLOCKS, sources, TIMEOUT_S)
    results = prefill.call("prefill_and_send", "r1", 0, PROMPT[:-1], SRC_BLOCKS, sinks,
                           targets, TIMEOUT_S)
    assert all(ok for _, _, ok, _, _ in results), results
    assert decode.call("wait_events", 1) == [("r1", 0, "landed", "")]
    # one digest per route, layer (the tiny model has 2) and block
    num_digests = len(head_routes(2, src_tp, dst_tp)) * 2 * len(DST_BLOCKS)
    if checksum == "off":
        num_digests = 0
    assert decode.call("verify", "r1") == (num_digests, [[]] * dst_tp)
    decode.call("corrupt", dst_tp - 1, "r1", 1, 2)  # layer 1, the third block, head 0
    _, mismatches = decode.call("verify", "r1")
    assert [len(m) for m in mismatches] == [0] * (dst_tp - 1) + [int(checksum == "all")]
    if checksum == "all":
        (mismatch,) = mismatches[-1]
        assert mismatch.digest[:4] == (0, dst_tp - 1, 1, 2)  # from source rank 0
        assert mismatch.block_id == targets[2] and mismatch.crc != mismatch.digest.crc
    decode.call("finish", "r1", False)
    _assert_nothing_held(decode, [0] * dst_tp)


def test_notice_for_a_stale_attempt_is_dropped(hosts, tiny_llama_dir):
    sources, sinks = _connect(hosts, tiny_llama_dir, "auto", "auto", "auto")
    prefill, decode = hosts
    decode.call("expect", "r1", 1, DST_BLOCKS, sources, TIMEOUT_S)
    prefill.call("prefill_and_send", "r1", 0, PROMPT[:-1], SRC_BLOCKS, sinks, DST_BLOCKS,
                 TIMEOUT_S)
    prefill.call("prefill_and_send", "r1", 1, PROMPT[:-1], SRC_BLOCKS, sinks, DST_BLOCKS,
                 TIMEOUT_S)
    assert decode.call("wait_events", 1) == [("r1", 1, "landed", "")]
    assert decode.call("stale_notices") == 1


def test_decode_peer_that_died_fails_its_requests_and_leaves_nothing(hosts, tiny_llama_dir):
    sources, sinks = _connect(hosts, tiny_llama_dir, "auto", "auto", "fp8")
    victim = Host()
    try:
        doomed = victim.call("setup_decode", str(tiny_llama_dir), "auto", "fp8", 1, 16, 8,
                             "victim")
        hosts[0].call("add_peers", doomed)
        victim.kill()
        hosts[0].call("begin_and_send", "lost", [doomed[0]["agent_name"]], [0, 1, 2],
                      SRC_BLOCKS, TIMEOUT_S)
        (result,) = hosts[0].call("send_results")
        assert result[:3] == ("lost", 0, False)
        hosts[0].call("remove_peer", doomed[0]["agent_name"])
        _assert_nothing_held(hosts[0], [2])  # the live decode peer's two lists only
        assert hosts[0].call("counts")["peers"] == [1]
        _transfer(hosts, sources, sinks)  # the live peer is unaffected
    finally:
        victim.close()


def test_prefill_peer_that_died_is_released_only_once_removed(hosts, tiny_llama_dir):
    _connect(hosts, tiny_llama_dir, "auto", "auto", "fp8")
    decode = hosts[1]
    victim = Host()
    try:
        doomed = victim.call("setup_prefill", str(tiny_llama_dir), "auto", "fp8", 1, 16,
                             "victim")
        decode.call("add_peers", doomed)
        victim.kill()
        name = doomed[0]["agent_name"]
        assert decode.call("expect", "lost", 0, DST_BLOCKS, [name], 0.0) == [0, 1, 2]
        # Past the deadline: failed, but a write could still land until the sender is gone.
        assert decode.call("wait_events", 1) == [("lost", 0, "failed", "deadline passed")]
        with pytest.raises(RuntimeError, match="could still land"):
            decode.call("finish", "lost", False)
        decode.call("remove_peer", name)
        assert decode.call("wait_events", 1) == [("lost", 0, "released", "deadline passed")]
        decode.call("finish", "lost", False)
        _assert_nothing_held(decode, [0])
    finally:
        victim.close()


def test_send_past_its_deadline_fails_but_keeps_its_buffer_until_closed(hosts, tiny_llama_dir):
    """The compute thread may still quantize into a failed send's slots until it calls
    finish, so they must not go to another request before that."""
    sources, sinks = _connect(hosts, tiny_llama_dir, "auto", "auto", "fp8")
    prefill, decode = hosts
    prefill.call("begin_only", "late", sinks, DST_BLOCKS, SRC_BLOCKS, 0.0)
    (result,) = prefill.call("send_results")
    assert result[:4] == ("late", 0, False, "deadline passed")
    assert prefill.call("counts")["free_send"] == [8 - len(SRC_BLOCKS)]
    prefill.call("close_send", "late")
    _assert_nothing_held(prefill, [2])
    # The decode side hears of it through the FAILED notice: failed, then released.
    decode.call("expect", "late2", 0, DST_BLOCKS, sources, TIMEOUT_S)
    prefill.call("begin_only", "late2", sinks, DST_BLOCKS, SRC_BLOCKS, 0.0)
    assert prefill.call("send_results")[0][:3] == ("late2", 0, False)
    assert decode.call("wait_events", 2) == [
        ("late2", 0, "failed", f"sender {sources[0]}: failed"),
        ("late2", 0, "released", f"sender {sources[0]}: failed")]
    prefill.call("close_send", "late2")
    decode.call("finish", "late2", False)
    _assert_nothing_held(decode, [0])


def test_creating_an_agent_leaves_nixl_as_found():
    import sys

    from kvtransfer import agent as agent_module

    api = sys.modules[agent_module._import_nixl()[0].__module__]
    before = api.nixlBind.nixlAgentConfig
    agent = agent_module.Agent("delay-check", [])
    try:
        assert api.nixlBind.nixlAgentConfig is before
    finally:
        agent.close()
