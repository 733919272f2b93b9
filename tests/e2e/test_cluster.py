"""The cluster end to end on a real local Ray, real NIXL and the tiny model (TP1 + TP1).

Remote is proven, not just counted: the decode worker computed only the last prompt token
and the prefill worker moved exactly the expected bytes.
"""

from __future__ import annotations

import dataclasses
import queue

import pytest

from cluster.launcher import launch
from engine.config import ModelConfig
from pdserve import protocol
from pdserve.config import DecodeConfig, PrefillConfig
from pdserve.hashing import hash_blocks
from pdserve.protocol import FinishReason, PeerRole
from pdserve.transport import EventLoopThread, open_connection
from pdserve.worker_stats import DecodeStats, PrefillCounts, PrefillStats, Role
from tests.e2e.cluster_harness import (
    BLOCK_SIZE,
    GREEDY,
    cluster_config,
    is_idle,
    kill_rank,
    offline_greedy,
    wait_for,
    worker_stats,
)
from tests.e2e.probes import PREFILL, Holds
from tests.unit.engine_oracle import hf_greedy, random_prompts, top1_margin

MIN_TOP1_MARGIN = 2e-3


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return ModelConfig.from_dir(tiny_llama_dir)


@pytest.fixture(scope="module")
def holds(ray_session):
    return Holds("cancel-me", "doomed")


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_llama_dir, holds):
    with launch(cluster_config(tiny_llama_dir), probe=holds.probe()) as cluster:
        yield cluster


def _decode(cluster) -> DecodeStats:
    (stats,) = worker_stats(cluster, Role.DECODE)
    return stats


def _prefill(cluster) -> PrefillStats:
    (stats,) = worker_stats(cluster, Role.PREFILL)
    return stats


def _expected_bytes(model: ModelConfig, num_prompt_tokens: int, num_cached: int) -> int:
    """fp32 K and V of every layer for the blocks decode lacks."""
    num_blocks = -(-(num_prompt_tokens - 1) // BLOCK_SIZE) - num_cached // BLOCK_SIZE
    return num_blocks * model.num_layers * 2 * model.num_kv_heads * BLOCK_SIZE * model.head_dim * 4


def test_long_short_and_cached_prompts_take_their_paths_and_match_hf(cluster, model,
                                                                      tiny_llama_dir):
    long, short = random_prompts([80, 12], model.vocab_size, seed=1)
    cached = long[:64] + short[:8]  # 4 blocks cached once `long` ran, 8 tokens to compute
    prompts = {"remote": long, "local": short, "cached": cached}
    expected = dict(zip(prompts, offline_greedy(tiny_llama_dir, list(prompts.values())),
                        strict=True))
    for name, prompt in prompts.items():
        hf_tokens, hf_logits = hf_greedy(str(tiny_llama_dir), prompt, GREEDY["max_tokens"])
        assert top1_margin(hf_logits) > MIN_TOP1_MARGIN, name
        assert expected[name] == hf_tokens, name

    before, sent_before = _decode(cluster), _prefill(cluster).bytes_sent
    result = cluster.generate(long, GREEDY)
    after = _decode(cluster)
    assert result.token_ids == expected["remote"]
    assert after.decisions.get("remote:long_uncached", 0) == 1
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 1
    assert _prefill(cluster).bytes_sent - sent_before == _expected_bytes(model, 80, 0)

    before = after
    result = cluster.generate(short, GREEDY)
    after = _decode(cluster)
    assert result.token_ids == expected["local"]
    assert after.decisions["local:short_uncached"] == 1
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 12

    before = after
    result = cluster.generate(cached, GREEDY)
    after = _decode(cluster)
    assert result.token_ids == expected["cached"]
    assert result.num_cached_tokens == 64
    assert after.decisions["local:short_uncached"] == 2
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == 8
    assert _prefill(cluster).jobs_done == 1
    wait_for(lambda: is_idle(cluster), "an idle cluster")


def test_remote_prefill_sends_only_the_blocks_decode_lacks(cluster, model, tiny_llama_dir):
    # `seen` went remote once, so both workers cache its blocks; `local` was prefilled on
    # decode only, so the prefill worker must recompute its prefix.
    seen, local, tail_a, tail_b = random_prompts([80, 30, 60, 70], model.vocab_size, seed=9)
    from_both = seen[:64] + tail_a  # decode holds 64 tokens, prefill holds them too
    from_decode = local[:16] + tail_b  # decode holds 16 tokens, prefill holds none
    expected = offline_greedy(tiny_llama_dir, [from_both, from_decode])
    cluster.generate(seen, GREEDY)
    cluster.generate(local, GREEDY)
    for prompt, num_cached, num_prefill_computed, want in (
            (from_both, 64, len(from_both) - 1 - 64, expected[0]),
            (from_decode, 16, len(from_decode) - 1, expected[1])):
        decode, prefill = _decode(cluster), _prefill(cluster)
        result = cluster.generate(prompt, GREEDY)
        assert result.token_ids == want
        assert result.num_cached_tokens == num_cached
        assert _decode(cluster).prefills.remote == decode.prefills.remote + 1
        assert (_decode(cluster).prompt_tokens_computed
                - decode.prompt_tokens_computed) == 1
        after = _prefill(cluster)
        assert (after.prompt_tokens_computed - prefill.prompt_tokens_computed
                == num_prefill_computed)
        assert (after.bytes_sent - prefill.bytes_sent
                == _expected_bytes(model, len(prompt), num_cached))
    wait_for(lambda: is_idle(cluster), "an idle cluster")


def test_many_concurrent_requests_complete_and_return_every_block(cluster, model,
                                                                  tiny_llama_dir):
    lengths = [5, 120, 33, 70, 9, 47, 100, 16, 64, 21, 90, 3, 55, 40, 110, 28]
    prompts = random_prompts(lengths, model.vocab_size, seed=2)
    expected = offline_greedy(tiny_llama_dir, prompts)
    before = _decode(cluster).prefills.remote
    streams = [cluster.submit(p, GREEDY) for p in prompts]
    assert [s.result(timeout_s=120).token_ids for s in streams] == expected
    assert _decode(cluster).prefills.remote - before == sum(n > 32 for n in lengths)
    wait_for(lambda: is_idle(cluster), "an idle cluster")


def test_cancel_while_kv_in_flight_frees_blocks_only_after_prefill_confirms(holds, cluster, model):
    (prompt,) = random_prompts([96], model.vocab_size, seed=3)
    holds.hold("cancel-me", 0, PREFILL)
    stream = cluster.submit(prompt, GREEDY, request_id="cancel-me")
    assert holds.wait_holding()
    cluster.client.cancel(stream)
    result = stream.result(timeout_s=60)
    assert result.finish_reason is FinishReason.ABORT
    # The prefill worker is stuck inside the layer: it has not confirmed, so decode still
    # holds the request's blocks, parked.
    decode = _decode(cluster)
    assert decode.num_stale == 1
    assert decode.num_blocks - decode.num_free_blocks == -(-95 // BLOCK_SIZE)
    holds.release()
    wait_for(lambda: is_idle(cluster), "both sides to free the cancelled request's blocks")


def test_subscribers_get_a_snapshot_then_numbered_kv_events_and_load(cluster, model):
    received: queue.SimpleQueue = queue.SimpleQueue()
    net = EventLoopThread("test-subscriber")
    try:
        (worker,) = cluster.decode_addresses()
        connection = net.run(open_connection(
            worker.host, worker.port, PeerRole.ROUTER, cluster.fingerprint, cluster.secret,
            lambda _, msg: received.put(msg), lambda _: None), timeout_s=30)
        connection.send(protocol.Subscribe())
        snapshot = received.get(timeout=30)
        assert isinstance(snapshot, protocol.KVSnapshot)
        assert isinstance(received.get(timeout=30), protocol.Load)
        (prompt,) = random_prompts([40], model.vocab_size, seed=8)
        cluster.generate(prompt, {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True})
        hashes, seq = set(snapshot.block_hashes), snapshot.seq
        while not set(hash_blocks(prompt[:32], BLOCK_SIZE)) <= hashes:
            msg = received.get(timeout=30)
            if isinstance(msg, protocol.KVEvents):
                assert msg.seq_start == seq  # numbered without gaps
                seq += len(msg.events)
                for event in msg.events:
                    is_stored = event.kind is protocol.KVEventKind.STORED
                    (hashes.add if is_stored else hashes.discard)(event.block_hash)
        connection.close()
    finally:
        net.stop()


def _idle_counts(cluster) -> dict:
    """Everything that must be back at idle after any number of requests."""
    decode, prefill = _decode(cluster), _prefill(cluster)
    return {"decode_free": decode.num_free_blocks, "decode_ranks": decode.ranks,
            "streams": decode.num_streams, "remote": decode.num_remote,
            "stale": decode.num_stale, "waiting": decode.num_waiting,
            "prefill_free": prefill.num_free_blocks, "prefill_ranks": prefill.ranks,
            "queue": prefill.queue_depth, "client": cluster.client.num_open_streams}


def _run_waves(cluster, prompts: list[list[int]], wave: int = 50) -> None:
    for start in range(0, len(prompts), wave):
        streams = [cluster.submit(p, {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True})
                   for p in prompts[start:start + wave]]
        assert all(len(s.result(timeout_s=120).token_ids) == 2 for s in streams)


def test_a_thousand_requests_leave_nothing_behind(cluster, model):
    # Short prompts, every tenth long enough to go remote.
    lengths = [40 if i % 10 == 0 else 4 + i % 9 for i in range(1100)]
    prompts = random_prompts(lengths, model.vocab_size, seed=6)
    _run_waves(cluster, prompts[:100])  # warm-up
    wait_for(lambda: is_idle(cluster), "an idle cluster")
    idle = _idle_counts(cluster)
    rss = (_decode(cluster).rss_bytes, _prefill(cluster).rss_bytes)
    remote = _decode(cluster).prefills.remote
    _run_waves(cluster, prompts[100:])
    wait_for(lambda: is_idle(cluster), "an idle cluster")
    assert _idle_counts(cluster) == idle
    assert _decode(cluster).prefills.remote - remote == 100
    # Resident memory: allocator noise only (a leak of a few hundred bytes per request
    # would already show as megabytes here).
    growth = (_decode(cluster).rss_bytes - rss[0], _prefill(cluster).rss_bytes - rss[1])
    assert max(growth) < 32 * 2**20, growth


def test_prefill_worker_killed_while_holding_a_job_falls_back_and_restarts(holds,
        cluster, model, tiny_llama_dir):
    prompts = random_prompts([100, 90], model.vocab_size, seed=4)
    expected = offline_greedy(tiny_llama_dir, prompts)
    holds.hold("doomed", 1, PREFILL)
    stream = cluster.submit(prompts[0], GREEDY, request_id="doomed")
    assert holds.wait_holding()
    fallbacks = _decode(cluster).prefills.fallback
    kill_rank(cluster, Role.PREFILL, 0)
    holds.release()  # the killed ranks\' waits at the gate end
    assert stream.result(timeout_s=120).token_ids == expected[0]
    assert _decode(cluster).prefills.fallback == fallbacks + 1
    wait_for(lambda: cluster.num_restarts == 1, "the prefill group to restart")
    wait_for(lambda: list(_decode(cluster).prefill_peers.values()) == [True],
             "decode to know the restarted prefill worker")
    remote = _decode(cluster).prefills.remote
    assert cluster.generate(prompts[1], GREEDY).token_ids == expected[1]
    assert _decode(cluster).prefills.remote == remote + 1
    assert _prefill(cluster).jobs_done == 1  # the new incarnation served it
    wait_for(lambda: is_idle(cluster), "an idle cluster")


def test_fp8_wire_into_a_model_dtype_pool_keeps_landed_blocks_out_of_the_cache(
        ray_session, model, tiny_llama_dir):
    (prompt,) = random_prompts([80], model.vocab_size, seed=7)
    config = cluster_config(tiny_llama_dir, wire="fp8")
    with launch(config) as cluster:
        first = cluster.generate(prompt, GREEDY)
        assert len(first.token_ids) == GREEDY["max_tokens"] and not first.error
        assert _decode(cluster).prefills == PrefillCounts(remote=1)
        # The KV arrived lossy: a second identical prompt finds nothing cached, so it goes
        # remote again instead of hitting blocks that depend on the fp8 round trip.
        second = cluster.generate(prompt, GREEDY)
        assert second.num_cached_tokens == 0
        assert _decode(cluster).prefills == PrefillCounts(remote=2)
        wait_for(lambda: is_idle(cluster), "an idle cluster")


def test_a_placement_ray_cannot_satisfy_fails_with_a_clear_error(ray_session, tiny_llama_dir):
    config = dataclasses.replace(cluster_config(tiny_llama_dir), placement_timeout_s=1.0,
                                 prefill=PrefillConfig(cpus_per_rank=64.0))
    with pytest.raises(RuntimeError, match=r"cannot place prefill worker 0: it needs 1 x "
                                           r"\{'CPU': 64.0\}"):
        launch(config)


def test_invalid_config_fails_at_launch_naming_the_field(ray_session, tiny_llama_dir):
    config = dataclasses.replace(cluster_config(tiny_llama_dir),
                                 decode=DecodeConfig(tensor_parallel_size=3))
    with pytest.raises(ValueError, match=r"decode.tensor_parallel_size: 3 is invalid"):
        launch(config)
