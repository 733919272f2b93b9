"""A process hosting KV-plane ranks for the transfer tests: real NIXL agents in separate
processes, driven over a pipe by the test.

The prefill host computes a prompt's KV with the engine's model runner (TP1) and streams it
layer by layer while computing; for other source TP sizes it copies each rank's heads of that
KV into a pool of its own and sends from there. The decode host holds bare pools (no model).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable
from typing import Any

WAIT_S = 60.0


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.001)


class Host:
    """The test's handle on one hosting process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()

    def call(self, function: str, *args: Any) -> Any:
        self._conn.send((function, args))
        if not self._conn.poll(WAIT_S * 2):
            raise TimeoutError(f"host did not answer {function}")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"{function} failed in the host:\n{value}")
        return value

    def kill(self) -> None:
        self.process.kill()
        self.process.join()

    def close(self) -> None:
        if self.process.is_alive():
            self._conn.send(None)
            self.process.join(30)


def _serve(conn) -> None:
    import torch

    torch.set_num_threads(1)
    state: dict[str, Any] = {"producers": [], "consumers": []}
    while True:
        message = conn.recv()
        if message is None:
            for side in state["producers"] + state["consumers"]:
                side.close()
            return
        function, args = message
        try:
            conn.send(("ok", _FUNCTIONS[function](state, *args)))
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            conn.send(("error", traceback.format_exc()))


def _pool(config, num_blocks: int, num_heads: int, kv_cache_dtype: str):
    import torch

    from engine.kv_cache import KVCache
    return KVCache(config.num_layers, num_blocks, num_heads, 16, config.head_dim,
                   torch.float32, kv_cache_dtype, "cpu")


def setup_decode(state, model_dir: str, kv_cache_dtype: str, wire: str, tp_size: int,
                 num_blocks: int, staging_blocks: int, name: str) -> list[dict]:
    """Bare pools for a decode TP group, one consumer each."""
    from engine.config import ModelConfig
    from engine.parallel import kv_head_range
    from kvtransfer.consumer import KVConsumer

    config = ModelConfig.from_dir(model_dir)
    for rank in range(tp_size):
        _, heads = kv_head_range(config.num_kv_heads, rank, tp_size)
        state["consumers"].append(KVConsumer(
            _pool(config, num_blocks, heads, kv_cache_dtype), agent_name=f"{name}-{rank}",
            tp_rank=rank, tp_size=tp_size, num_kv_heads=config.num_kv_heads,
            kv_transfer_dtype=wire, staging_blocks=staging_blocks))
    return [c.endpoint().to_wire() for c in state["consumers"]]


def setup_prefill(state, model_dir: str, kv_cache_dtype: str, wire: str, tp_size: int,
                  num_blocks: int, name: str, checksum: str = "off") -> list[dict]:
    """A TP1 model runner; with ``tp_size`` > 1, a pool per source rank beside it."""
    from engine.config import ModelConfig
    from engine.model_runner import ModelRunner, RunnerOptions
    from engine.parallel import TensorParallel, kv_head_range
    from kvtransfer.producer import KVProducer
    from pdserve.choices import KVChecksum

    config = ModelConfig.from_dir(model_dir)
    state["config"] = config
    state["runner"] = ModelRunner(RunnerOptions(model_dir, config, "float32", "cpu", num_blocks,
                                                16, kv_cache_dtype, 512), TensorParallel())
    for rank in range(tp_size):
        _, heads = kv_head_range(config.num_kv_heads, rank, tp_size)
        pool = (state["runner"].kv_cache if tp_size == 1
                else _pool(config, num_blocks, heads, kv_cache_dtype))
        state["producers"].append(KVProducer(
            pool, agent_name=f"{name}-{rank}", tp_rank=rank, tp_size=tp_size,
            num_kv_heads=config.num_kv_heads, kv_transfer_dtype=wire, send_buffer_blocks=8,
            kv_transfer_checksum=KVChecksum(checksum)))
    return [p.endpoint().to_wire() for p in state["producers"]]


def add_peers(state, endpoints: list[dict]) -> None:
    from kvtransfer.endpoint import Endpoint

    for side in state["producers"] + state["consumers"]:
        for endpoint in endpoints:
            side.add_peer(Endpoint.from_wire(endpoint))


def remove_peer(state, agent_name: str) -> None:
    for side in state["producers"] + state["consumers"]:
        side.remove_peer(agent_name)


def expect(state, request_id: str, attempt: int, pool_blocks: list[int], sources: list[str],
           timeout_s: float) -> list[int] | None:
    targets = [c.expect(request_id, attempt, pool_blocks, sources, timeout_s)
               for c in state["consumers"]]
    assert all(t == targets[0] for t in targets), targets
    return targets[0]


def prefill_and_send(state, request_id: str, attempt: int, token_ids: list[int],
                     src_blocks: list[int], agents: list[str], dst_blocks: list[int],
                     timeout_s: float) -> list[tuple]:
    """Compute ``token_ids``' KV into ``src_blocks`` and send it; the send results."""
    from engine.model_runner import ModelInput, SequenceInput
    from kvtransfer.endpoint import Destination

    producers = state["producers"]
    destination = Destination(tuple(agents), tuple(dst_blocks))
    for producer in producers:
        assert producer.begin(request_id, attempt, destination, src_blocks, timeout_s)
    streaming = len(producers) == 1 and producers[0].kv_cache is state["runner"].kv_cache
    batch = ModelInput([SequenceInput(token_ids, 0, src_blocks, needs_logits=False)])
    state["runner"].execute(batch, lambda layer: producers[0].send_layer(request_id, layer)
                            if streaming else None)
    if not streaming:
        _copy_heads(state, src_blocks)
        for producer in producers:
            for layer in range(state["config"].num_layers):
                producer.send_layer(request_id, layer)
    for producer in producers:
        producer.finish(request_id)
    return [tuple(wait_for(p.poll, "a send result")[0]) for p in producers]


def _copy_heads(state, blocks: list[int]) -> None:
    """Give each source rank its heads of the TP1 runner's KV."""
    from engine.parallel import kv_head_range

    full = state["runner"].kv_cache
    for producer in state["producers"]:
        first, count = kv_head_range(state["config"].num_kv_heads, producer.tp_rank,
                                      producer.tp_size)
        pool = producer.kv_cache
        pool.data[:, :, blocks] = full.data[:, :, blocks, first:first + count]
        if pool.scales is not None:
            pool.scales[:, :, blocks] = full.scales[:, :, blocks, first:first + count]


def wait_events(state, count: int) -> list[tuple]:
    """Rank 0's next ``count`` transfer events."""
    events: list[tuple] = []

    def more() -> bool:
        events.extend(tuple(e) for e in state["consumers"][0].poll())
        return len(events) >= count
    wait_for(more, f"{count} transfer events")
    return [(e[0], e[1], e[2].value, e[3]) for e in events]


def send_results(state) -> list[tuple]:
    return [tuple(wait_for(p.poll, "a send result")[0]) for p in state["producers"]]


def begin_and_send(state, request_id: str, agents: list[str], dst_blocks: list[int],
                   src_blocks: list[int], timeout_s: float) -> None:
    """Send whatever the pools hold (no compute): for failure tests."""
    from kvtransfer.endpoint import Destination

    for producer in state["producers"]:
        assert producer.begin(request_id, 0, Destination(tuple(agents), tuple(dst_blocks)),
                              src_blocks, timeout_s)
        for layer in range(producer.kv_cache.data.shape[0]):
            producer.send_layer(request_id, layer)
        producer.finish(request_id)


def begin_only(state, request_id: str, agents: list[str], dst_blocks: list[int],
               src_blocks: list[int], timeout_s: float) -> None:
    from kvtransfer.endpoint import Destination

    for producer in state["producers"]:
        assert producer.begin(request_id, 0, Destination(tuple(agents), tuple(dst_blocks)),
                              src_blocks, timeout_s)


def close_send(state, request_id: str) -> None:
    """``finish`` on every producer, then wait until its send-buffer slots are back."""
    for producer in state["producers"]:
        producer.finish(request_id)
        wait_for(lambda p=producer: p.num_free_send_blocks == p.region.slots.num_slots,
                 "the send buffer to be free")


def finish(state, request_id: str, materialize: bool) -> None:
    for consumer in state["consumers"]:
        consumer.finish(request_id, materialize)


def verify(state, request_id: str) -> tuple[int, list[list]]:
    """How many digests rank 0 collected, and each decode rank's mismatches against them."""
    digests = state["consumers"][0].digests(request_id)
    return len(digests), [c.verify(request_id, digests) for c in state["consumers"]]


def corrupt(state, rank: int, request_id: str, layer: int, position: int) -> None:
    """Flip the first byte of what landed on ``rank`` for the request's block at
    ``position``: K of ``layer``, its first head (a NIXL write that went wrong)."""
    import torch

    consumer = state["consumers"][rank]
    block = consumer.landed_blocks(request_id)[position]
    consumer.region.data[layer, 0, block].view(torch.uint8).view(-1)[0] ^= 0x01


def pools(state, side: str) -> list[tuple]:
    """(data, scales) of every rank's pool, as float32 / raw bytes for comparison."""
    out = []
    for rank in state[side]:
        pool = rank.kv_cache
        out.append((pool.data.clone(), None if pool.scales is None else pool.scales.clone()))
    return out


def computed_kv(state):
    return state["runner"].kv_cache.data.clone()


def reset(state) -> None:
    for side in state["producers"] + state["consumers"]:
        side.close()
    state["producers"].clear()
    state["consumers"].clear()


def stale_notices(state) -> int:
    return state["consumers"][0].num_stale_notices


def counts(state) -> dict[str, list]:
    """What each rank still holds: handles, staging and send-buffer slots, requests."""
    return {
        "handles": [s.agent.num_live_handles for s in state["producers"] + state["consumers"]],
        "peers": [len(s.agent.peers) for s in state["producers"] + state["consumers"]],
        "free_send": [p.num_free_send_blocks for p in state["producers"]],
        "free_staging": [c.num_free_staging_blocks for c in state["consumers"]],
        "expected": [c.num_expected for c in state["consumers"]],
    }


_FUNCTIONS = {f.__name__: f for f in (
    setup_decode, setup_prefill, add_peers, remove_peer, expect, prefill_and_send,
    wait_events, send_results, begin_and_send, finish, pools, counts, reset,
    stale_notices, computed_kv, begin_only, close_send, verify, corrupt)}
