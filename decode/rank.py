"""One decode rank: its model and KV pool, and the receiving side of the KV plane.

Rank 0's ``DecodeWorker`` runs these methods on every rank through ``RankGroup``; only rank 0
polls the consumer (every sender's notice goes to rank 0).
"""

from __future__ import annotations

import torch

from engine.model_runner import ModelInput, ModelRunner, RunnerOptions
from engine.parallel import TensorParallel
from kvtransfer.checksum import BlockDigest, Mismatch
from kvtransfer.consumer import KVConsumer
from kvtransfer.endpoint import Endpoint
from pdserve.probe import Probe
from pdserve.worker_stats import DecodeRankCounts


class DecodeRank:
    """One decode rank: the model runner over its KV pool, and the KV consumer."""

    def __init__(self, options: RunnerOptions, tp: TensorParallel, agent_name: str,
                 kv_transfer_dtype: str, staging_blocks: int, probe: Probe | None = None):
        self.probe = probe or Probe()
        self.runner = ModelRunner(options, tp)
        self.consumer = KVConsumer(self.runner.kv_cache, agent_name=agent_name,
                                   tp_rank=tp.rank, tp_size=tp.size,
                                   num_kv_heads=options.model.num_kv_heads,
                                   kv_transfer_dtype=kv_transfer_dtype,
                                   staging_blocks=staging_blocks)

    def execute(self, batch: ModelInput) -> torch.Tensor:
        return self.runner.execute(batch)

    def endpoint(self) -> dict:
        return self.consumer.endpoint().to_wire()

    def add_peers(self, endpoints: list[dict]) -> None:
        for endpoint in endpoints:
            self.consumer.add_peer(Endpoint.from_wire(endpoint))

    def remove_peers(self, agent_names: list[str]) -> None:
        for name in agent_names:
            self.consumer.remove_peer(name)

    def expect(self, request_id: str, attempt: int, pool_blocks: list[int],
               sources: list[str], timeout_s: float) -> list[int] | None:
        return self.consumer.expect(request_id, attempt, pool_blocks, sources, timeout_s)

    def verify_kv(self, request_id: str, digests: list[BlockDigest]) -> list[Mismatch]:
        """The landed KV's wire bytes on this rank that do not match their digests."""
        self.probe.before_kv_verify(request_id, self.consumer.tp_rank, self.consumer.region.data,
                                    self.consumer.landed_blocks(request_id))
        return self.consumer.verify(request_id, digests)

    def finish_kv(self, request_id: str, materialize: bool) -> None:
        self.consumer.finish(request_id, materialize)

    def counts(self) -> DecodeRankCounts:
        """What this rank holds on the KV plane (idle: no expectation, full staging)."""
        return DecodeRankCounts(self.consumer.num_expected,
                                self.consumer.num_free_staging_blocks,
                                self.consumer.agent.num_live_handles)

    def close(self) -> None:
        self.consumer.close()
