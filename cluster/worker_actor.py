"""The Ray actor behind every worker rank (decode or prefill, any TP rank).

Ray places and starts it; ``start`` joins the TP group's process group, builds the rank's
model, pool and NIXL agent (a fresh agent name per incarnation), and on rank 0 starts the
worker (its engine thread and request-plane server). Ranks 1.. follow rank 0's calls in a
thread. Torch, NIXL and the engine are imported inside the actor process only.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

import ray


@ray.remote
class WorkerRank:
    def __init__(self, role: str, worker_id: str, rank: int, size: int, config: dict,
                 secret: str, cpu: int | None = None):
        from pdserve.config import ClusterConfig

        self.role, self.worker_id, self.rank, self.size = role, worker_id, rank, size
        self.config = ClusterConfig.from_dict(config)
        self.secret = secret
        if cpu is not None:  # a benchmark's hardware budget: this process on one core
            os.sched_setaffinity(0, {cpu})
        self.driver: Any = None
        self.rank_worker: Any = None
        self._stopped = threading.Event()
        logging.basicConfig(level=self.config.log_level.upper(),
                            format=f"%(asctime)s {worker_id}.r{rank} %(name)s: %(message)s")

    def master_address(self) -> tuple[str, int]:
        from engine.rank_group import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def start(self, host: str, port: int) -> dict:
        """Join the group and build this rank; rank 0 returns the worker's address and
        every rank's KV endpoint."""
        from engine.rank_group import broadcast_object, join_group, set_threads

        set_threads(self.config.num_threads)
        from engine.engine import resolve_device

        # the device the engine will use (None picks CUDA when there is one): nccl there
        is_cuda = resolve_device(self.config.device).startswith("cuda")
        join_group(host, port, self.rank, self.size, is_cuda=is_cuda)
        options = self._plan() if self.rank == 0 else None
        if self.size > 1:
            options = broadcast_object(options)
        self.rank_worker = self._build_rank(options)
        if self.rank > 0:
            threading.Thread(target=self._follow, name="follow", daemon=True).start()
            return {}
        self.driver = self._build_driver(options)
        return {"address": list(self.driver.address), "endpoints": self.driver.endpoints}

    def _follow(self) -> None:
        from engine.rank_group import follow

        try:
            follow(self.rank_worker)
        finally:
            self.rank_worker.close()
            self._stopped.set()

    def _role_config(self):
        return self.config.decode if self.role == "decode" else self.config.prefill

    def _plan(self):
        from engine.engine import plan_runner

        return plan_runner(self.config.model_dir, self._engine_config())

    def _engine_config(self):
        from engine.config import EngineConfig

        role = self._role_config()
        return EngineConfig(
            block_size=self.config.block_size, num_blocks=role.num_blocks,
            max_num_batched_tokens=role.max_num_batched_tokens, max_num_seqs=role.max_num_seqs,
            max_model_len=self.config.max_model_len, kv_cache_dtype=role.kv_cache_dtype,
            enable_prefix_caching=role.enable_prefix_caching, dtype=self.config.dtype,
            device=self.config.device, tensor_parallel_size=self.size,
            num_threads=self.config.num_threads, seed=self.config.seed)

    def _build_rank(self, options):
        from engine.parallel import TensorParallel

        tp = TensorParallel(self.rank, self.size)
        agent_name = f"{self.worker_id}-r{self.rank}-{uuid.uuid4().hex[:8]}"
        wire = self.config.kv_transfer_dtype
        if self.role == "decode":
            from decode.rank import DecodeRank

            return DecodeRank(options, tp, agent_name, wire, self.config.decode.staging_blocks)
        from prefill.rank import PrefillRank

        return PrefillRank(options, tp, agent_name, wire,
                           self.config.prefill.send_buffer_blocks)

    def _build_driver(self, options):
        from engine.rank_group import RankGroup
        from pdserve.protocol import Fingerprint

        group = RankGroup(self.rank_worker, self.size)
        fingerprint = Fingerprint.of_model(self.config.model_dir, self.config.block_size,
                                           self.config.dtype, self.config.kv_transfer_dtype)
        host = ray.util.get_node_ip_address()
        if self.role == "decode":
            return self._build_decode(options, group, fingerprint, host)
        return self._build_prefill(options, group, fingerprint, host)

    def _build_decode(self, options, group, fingerprint, host):
        from decode.worker import DecodeOptions, DecodeWorker
        from engine.engine import LLMEngine

        engine = LLMEngine(self.config.model_dir, self._engine_config(),
                           executor=_GroupExecutor(group), options=options)
        role = self.config.decode
        decode_options = DecodeOptions(
            self.worker_id, role.disagg_mode, role.max_local_prefill_tokens,
            role.max_prefill_queue, role.max_remote_reserved_blocks,
            role.remote_prefill_timeout_s,
            is_lossy_wire=self.config.kv_transfer_dtype == "fp8"
            and role.kv_cache_dtype == "auto")
        return DecodeWorker(group, engine, decode_options, fingerprint, self.secret, host)

    def _build_prefill(self, options, group, fingerprint, host):
        from engine.block_manager import BlockManager
        from prefill.worker import PrefillOptions, PrefillWorker

        role = self.config.prefill
        block_manager = BlockManager(options.num_blocks, options.block_size,
                                     role.enable_prefix_caching)
        prefill_options = PrefillOptions(self.worker_id, role.max_num_seqs,
                                         role.max_num_batched_tokens, options.max_model_len)
        return PrefillWorker(group, block_manager, prefill_options, fingerprint, self.secret,
                             host)

    # -- rank 0's control surface ---------------------------------------------------------

    def control(self, kind: str, *args: Any, timeout_s: float = 60.0) -> Any:
        return self.driver.control(kind, *args).result(timeout_s)

    def hold(self, request_id: str, at: int) -> None:
        """Test hook. Prefill: the forward pass computing ``request_id`` stops after layer
        ``at``. Decode: the engine loop stops once ``request_id`` has ``at`` output tokens
        (they were sent)."""
        self.rank_worker.is_holding.clear()
        self.rank_worker.release_hold.clear()
        self.rank_worker.hold = (request_id, at)

    def wait_holding(self, timeout_s: float) -> bool:
        return self.rank_worker.is_holding.wait(timeout_s)

    def release_hold(self) -> None:
        self.rank_worker.release_hold.set()

    def wait_stopped(self) -> None:
        """Returns when the rank stops; raises (RayActorError) when its process dies."""
        self._stopped.wait()

    def shutdown(self) -> None:
        if self.driver is not None:
            self.driver.shutdown()
            self._stopped.set()


class _GroupExecutor:
    """The engine's executor over a rank group: every rank runs the step."""

    def __init__(self, group):
        self.group = group

    def execute(self, batch):
        return self.group.call("execute", batch)

    def shutdown(self) -> None:
        pass
