"""The two sides of the KV transfer benchmarks (scripts/bench_kvtransfer.py,
scripts/bench_kv_checksum.py): the decode side runs in its own process (bare pools and
consumers), the prefill side in the caller's (the engine's model runner and producers).
Each path may digest its KV (``checksums``); the decode side then verifies it on landing."""

from __future__ import annotations

import multiprocessing
import time

import torch

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model_runner import ModelInput, ModelRunner, RunnerOptions, SequenceInput
from engine.parallel import TensorParallel
from kvtransfer.consumer import EventKind, KVConsumer
from kvtransfer.endpoint import Destination, Endpoint
from kvtransfer.layout import layer_indices
from kvtransfer.producer import KVProducer
from pdserve.choices import KVChecksum

BLOCK_SIZE = 16
# name -> (pool kv_cache_dtype on both sides, kv_transfer_dtype)
PATHS = {"fp8": ("auto", "fp8"), "auto": ("auto", "auto"), "fp8-pool": ("fp8", "fp8")}


# -- the decode side, in its own process ------------------------------------------------------

def decode_side(conn, model_dir: str, num_blocks: int, paths: dict) -> None:
    """Bare pools (model dtype, fp8) with one consumer per path; answers the parent."""
    torch.set_num_threads(1)
    config = ModelConfig.from_dir(model_dir)
    pools = {dtype: KVCache(config.num_layers, num_blocks, config.num_kv_heads, BLOCK_SIZE,
                            config.head_dim, torch.float32, dtype, "cpu")
             for dtype in ("auto", "fp8")}
    consumers = {path: KVConsumer(pools[dtype], agent_name=f"bench-decode-{path}", tp_rank=0,
                                  tp_size=1, num_kv_heads=config.num_kv_heads,
                                  kv_transfer_dtype=wire, staging_blocks=num_blocks)
                 for path, (dtype, wire) in paths.items()}
    conn.send({wire: c.endpoint().to_wire() for wire, c in consumers.items()})
    while (message := conn.recv()) is not None:
        kind, wire, *rest = message
        consumer = consumers[wire]
        if kind == "peer":
            consumer.add_peer(Endpoint.from_wire(rest[0]))
            conn.send(None)
        elif kind == "expect":
            request_id, blocks, source = rest
            conn.send(consumer.expect(request_id, 0, blocks, [source], 600.0))
        elif kind == "land":
            while not any(e.kind is EventKind.LANDED for e in consumer.poll()):
                time.sleep(0.0005)
            checked = verify(consumer, rest[0])
            consumer.finish(rest[0], materialize=True)
            conn.send(checked)
    for consumer in consumers.values():
        consumer.close()


def verify(consumer: KVConsumer, request_id: str) -> dict:
    """Check a landed request's digests, as the decode worker does (none: nothing to do)."""
    start = time.perf_counter()
    digests = consumer.digests(request_id)
    mismatches = consumer.verify(request_id, digests) if digests else []
    return {"verify_s": time.perf_counter() - start, "num_digests": len(digests),
            "num_mismatches": len(mismatches)}


class DecodeSide:
    def __init__(self, model_dir: str, num_blocks: int, paths: dict = PATHS):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=decode_side,
                                       args=(child, model_dir, num_blocks, paths))
        self.process.start()
        self.endpoints = {w: Endpoint.from_wire(e) for w, e in self.conn.recv().items()}

    def call(self, *message):
        self.conn.send(message)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


# -- the prefill side ---------------------------------------------------------------------------

class PrefillSide:
    def __init__(self, model_dir: str, decode: DecodeSide, num_blocks: int,
                 paths: dict = PATHS, checksums: dict | None = None):
        self.config = ModelConfig.from_dir(model_dir)
        self.runner = ModelRunner(RunnerOptions(model_dir, self.config, "float32", "cpu",
                                                num_blocks, BLOCK_SIZE, "auto", 4096),
                                  TensorParallel())
        self.decode = decode
        # For the fp8-pool path: the runner's KV quantized into an fp8 pool, sent as is.
        self.fp8_pool = KVCache(self.config.num_layers, num_blocks, self.config.num_kv_heads,
                                BLOCK_SIZE, self.config.head_dim, torch.float32, "fp8", "cpu")
        self.paths, self.producers = paths, {}
        for wire, (dtype, kv_transfer_dtype) in paths.items():
            pool = self.fp8_pool if dtype == "fp8" else self.runner.kv_cache
            producer = KVProducer(pool, agent_name=f"bench-prefill-{wire}", tp_rank=0,
                                  tp_size=1, num_kv_heads=self.config.num_kv_heads,
                                  kv_transfer_dtype=kv_transfer_dtype,
                                  send_buffer_blocks=num_blocks,
                                  kv_transfer_checksum=(checksums or {}).get(
                                      wire, KVChecksum.OFF))
            producer.add_peer(decode.endpoints[wire])
            decode.call("peer", wire, producer.endpoint().to_wire())
            self.producers[wire] = producer
        self._requests = 0

    def prefill(self, token_ids: list[int], blocks: list[int], wire: str | None) -> dict:
        """Compute ``token_ids``' KV, streaming it if ``wire``; seconds to compute and to done."""
        batch = ModelInput([SequenceInput(token_ids, 0, blocks, needs_logits=False)])
        if wire is None:
            start = time.perf_counter()
            self.runner.execute(batch)
            elapsed = time.perf_counter() - start
            return {"compute_s": elapsed, "done_s": elapsed}
        producer, request_id, targets = self._open(wire, blocks)
        start = time.perf_counter()
        producer.begin(request_id, 0, Destination((producer_peer(self, wire),), tuple(targets)),
                       blocks, 600.0)
        self.runner.execute(batch, lambda layer: producer.send_layer(request_id, layer))
        computed = time.perf_counter() - start
        producer.finish(request_id)
        result = wait_result(producer)
        done = time.perf_counter() - start
        checked = self.decode.call("land", wire, request_id)
        return {"compute_s": computed, "done_s": done, "num_bytes": result.num_bytes,
                "landed_s": time.perf_counter() - start, **checked}

    def send_only(self, blocks: list[int], wire: str) -> tuple[float, int]:
        """The streaming path with the KV already in the pool: seconds and bytes."""
        producer, request_id, targets = self._open(wire, blocks)
        start = time.perf_counter()
        producer.begin(request_id, 0, Destination((producer_peer(self, wire),), tuple(targets)),
                       blocks, 600.0)
        for layer in range(self.config.num_layers):
            producer.send_layer(request_id, layer)
        producer.finish(request_id)
        result = wait_result(producer)
        elapsed = time.perf_counter() - start
        self.decode.call("land", wire, request_id)
        return elapsed, result.num_bytes

    def raw_nixl(self, blocks: list[int], wire: str) -> float:
        """Raw NIXL WRITEs of the descriptors the streaming path posts (one per layer), into
        the same region, polled in a tight loop: no thread, no notice, no quantization."""
        producer = self.producers[wire]
        peer = producer._peers[producer_peer(self, wire)]  # noqa: SLF001 - bench internals
        nixl = producer.agent.nixl
        local, remote = producer.agent.dlist(peer.local_list), producer.agent.dlist(
            peer.remote_list)
        # The fp8 wire moves send-buffer slots into staging slots: use the first ones.
        slots = list(range(len(blocks)))
        sources = blocks if producer.region.is_pool else slots
        lands_in_staging = self.paths[wire] == ("auto", "fp8")
        targets = slots if lands_in_staging else blocks
        start = time.perf_counter()
        handles = []
        for layer in range(self.config.num_layers):
            handle = nixl.make_prepped_xfer(
                "WRITE", local, layer_indices(producer.region.geometry, layer, sources),
                remote, layer_indices(peer.endpoint.geometry, layer, targets))
            nixl.transfer(handle)
            handles.append(handle)
        for handle in handles:
            while nixl.check_xfer_state(handle) == "PROC":  # a tight loop, nothing else
                pass
        elapsed = time.perf_counter() - start
        for handle in handles:
            nixl.release_xfer_handle(handle)
        return elapsed

    def _open(self, wire: str, blocks: list[int]):
        self._requests += 1
        request_id = f"bench-{self._requests}"
        targets = self.decode.call("expect", wire, request_id, blocks,
                                   self.producers[wire].agent.name)
        return self.producers[wire], request_id, targets

    def close(self) -> None:
        for producer in self.producers.values():
            producer.close()


def producer_peer(side: PrefillSide, wire: str) -> str:
    return side.decode.endpoints[wire].agent_name


def wait_result(producer: KVProducer):
    while not (results := producer.poll(timeout_s=1.0)):
        pass
    (result,) = results
    if not result.ok:
        raise RuntimeError(f"send failed: {result.reason}")
    return result
