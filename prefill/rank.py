"""One prefill rank: its model and KV pool, and the sending side of the KV plane.

Rank 0's ``PrefillWorker`` runs these methods on every rank through ``RankGroup``. During a
forward pass, after each layer, every rank posts that layer's KV of the jobs in the batch
(``sends``), so the transfer of layer ``i`` overlaps the compute of layer ``i + 1``.
"""

from __future__ import annotations

import logging

from engine.model_runner import ModelInput, ModelRunner, RunnerOptions
from engine.parallel import TensorParallel
from kvtransfer.endpoint import Destination, Endpoint
from kvtransfer.producer import KVProducer
from pdserve.choices import KVChecksum
from pdserve.probe import Probe
from pdserve.worker_stats import PrefillRankCounts

logger = logging.getLogger(__name__)

# (request id, first block of the job's send list, number of blocks)
Send = tuple[str, int, int]


class PrefillRank:
    """One prefill rank: the model runner over its KV pool, and the KV producer."""

    def __init__(self, options: RunnerOptions, tp: TensorParallel, agent_name: str,
                 kv_transfer_dtype: str, send_buffer_blocks: int, probe: Probe | None = None,
                 kv_transfer_checksum: KVChecksum = KVChecksum.OFF):
        self.probe = probe or Probe()
        self.runner = ModelRunner(options, tp)
        self.num_layers = options.model.num_layers
        self.producer = KVProducer(self.runner.kv_cache, agent_name=agent_name,
                                   tp_rank=tp.rank, tp_size=tp.size,
                                   num_kv_heads=options.model.num_kv_heads,
                                   kv_transfer_dtype=kv_transfer_dtype,
                                   send_buffer_blocks=send_buffer_blocks,
                                   kv_transfer_checksum=kv_transfer_checksum,
                                   probe=self.probe)

    def execute(self, batch: ModelInput, sends: list[Send]) -> None:
        def after_layer(layer: int) -> None:
            for request_id, first_block, num_blocks in sends:
                self.producer.send_layer(request_id, layer, first_block, num_blocks)
                logger.debug("request %s: layer %d posted, blocks %d..%d", request_id, layer,
                             first_block, first_block + num_blocks - 1)
                self.probe.after_layer(request_id, layer)

        self.runner.execute(batch, after_layer)

    def send_all(self, request_id: str) -> None:
        """Every layer of a job whose KV is already in the pool (a prefix-cache hit)."""
        for layer in range(self.num_layers):
            self.producer.send_layer(request_id, layer)

    def begin(self, request_id: str, attempt: int, agents: list[str], block_ids: list[int],
              src_blocks: list[int], timeout_s: float) -> bool:
        return self.producer.begin(request_id, attempt,
                                   Destination(tuple(agents), tuple(block_ids)), src_blocks,
                                   timeout_s)

    def withdraw(self, request_id: str) -> None:
        self.producer.withdraw(request_id)

    def finish(self, request_id: str) -> None:
        self.producer.finish(request_id)

    def cancel(self, request_id: str) -> None:
        self.producer.cancel(request_id)

    def poll(self, timeout_s: float) -> list[tuple]:
        return [tuple(result) for result in self.producer.poll(timeout_s)]

    def endpoint(self) -> dict:
        return self.producer.endpoint().to_wire()

    def add_peers(self, endpoints: list[dict]) -> None:
        for endpoint in endpoints:
            self.producer.add_peer(Endpoint.from_wire(endpoint))

    def remove_peers(self, agent_names: list[str]) -> None:
        for name in agent_names:
            self.producer.remove_peer(name)

    def counts(self) -> PrefillRankCounts:
        return PrefillRankCounts(self.producer.num_free_send_blocks,
                                 self.producer.agent.num_live_handles)

    def close(self) -> None:
        self.producer.close()
