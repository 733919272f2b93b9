"""The Ray actor behind every worker rank (decode or prefill, any TP rank).

Ray places and starts it; ``start`` joins the TP group's process group, builds the rank's
model, pool and NIXL agent (a fresh agent name per incarnation), and on rank 0 starts the
worker: its loop thread (``cluster.worker_loop``) and request-plane server, driving the role
(``DecodeWorker`` or ``PrefillWorker``). Ranks 1.. follow rank 0's calls in a thread. Torch,
NIXL and the engine are imported inside the actor process only.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import ray

from pdserve.config import ClusterConfig
from pdserve.probe import Probe
from pdserve.protocol import Fingerprint, PeerRole
from pdserve.worker_commands import EndpointWire
from pdserve.worker_stats import Role

LOOPBACK = "127.0.0.1"

@dataclass(frozen=True, slots=True)
class RankIdentity:
    """Which rank of which worker an actor is."""

    role: Role
    worker_id: str
    rank: int
    size: int


@dataclass(frozen=True, slots=True)
class StartedWorker:
    """What rank 0 reports once its worker runs: the request-plane address and every rank's
    KV-plane endpoint."""

    host: str
    port: int
    endpoints: list[EndpointWire]


@ray.remote
class WorkerRank:
    """One rank's process; rank 0 also runs the worker's loop and answers control commands."""

    def __init__(self, identity: RankIdentity, config: ClusterConfig, fingerprint: Fingerprint,
                 secret: str, cpu: int | None = None, probe: Probe | None = None):
        self.identity = identity
        self.config = config
        self.fingerprint, self.secret = fingerprint, secret
        self.probe = probe or Probe()
        if cpu is not None:  # a benchmark's hardware budget: this process on one core
            os.sched_setaffinity(0, {cpu})
        self.loop: Any = None
        self.rank_worker: Any = None
        self._stopped = threading.Event()
        logging.basicConfig(
            level=config.log_level.upper(),
            format=f"%(asctime)s {identity.worker_id}.r{identity.rank} %(name)s: %(message)s")

    def master_address(self) -> tuple[str, int]:
        from engine.rank_group import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def start(self, host: str, port: int) -> StartedWorker | None:
        """Join the group and build this rank; rank 0 starts the worker and says where."""
        from engine.engine import resolve_device
        from engine.rank_group import broadcast_object, join_group, set_threads

        set_threads(self.config.num_threads)
        rank, size = self.identity.rank, self.identity.size
        # the device the engine will use (None picks CUDA when there is one): nccl there
        is_cuda = resolve_device(self.config.device).startswith("cuda")
        join_group(host, port, rank, size, is_cuda=is_cuda)
        options = self._plan() if rank == 0 else None
        if size > 1:
            options = broadcast_object(options)
        self.rank_worker = self._build_rank(options)
        if rank > 0:
            threading.Thread(target=self._follow, name="follow", daemon=True).start()
            return None
        role = self._build_role(options)
        self.loop.start(role)
        return StartedWorker(*self.loop.address, role.endpoints)

    def _follow(self) -> None:
        from engine.rank_group import follow

        try:
            follow(self.rank_worker)
        finally:
            self.rank_worker.close()
            self._stopped.set()

    def _role_config(self):
        is_decode = self.identity.role is Role.DECODE
        return self.config.decode if is_decode else self.config.prefill

    def _plan(self):
        from engine.engine import plan_runner

        return plan_runner(self.config.model_dir, self._engine_config())

    def _engine_config(self):
        from engine.config import EngineConfig

        role, config = self._role_config(), self.config
        return EngineConfig(
            block_size=config.block_size, num_blocks=role.num_blocks,
            max_num_batched_tokens=role.max_num_batched_tokens, max_num_seqs=role.max_num_seqs,
            max_model_len=config.max_model_len, kv_cache_dtype=role.kv_cache_dtype,
            enable_prefix_caching=role.enable_prefix_caching, dtype=config.dtype,
            device=config.device, tensor_parallel_size=self.identity.size,
            num_threads=config.num_threads, seed=config.seed,
            attention_backend=config.attention_backend, quantization=config.quantization)

    def _build_rank(self, options):
        from engine.parallel import TensorParallel

        identity = self.identity
        tp = TensorParallel(identity.rank, identity.size)
        agent_name = f"{identity.worker_id}-r{identity.rank}-{uuid.uuid4().hex[:8]}"
        wire = self.config.kv_transfer_dtype
        if identity.role is Role.DECODE:
            from decode.rank import DecodeRank

            return DecodeRank(options, tp, agent_name, wire, self.config.decode.staging_blocks,
                              self.probe)
        from prefill.rank import PrefillRank

        return PrefillRank(options, tp, agent_name, wire,
                           self.config.prefill.send_buffer_blocks, self.probe,
                           self.config.kv_transfer_checksum)

    def _build_role(self, options):
        from cluster.worker_loop import WorkerLoop
        from engine.rank_group import RankGroup

        group = RankGroup(self.rank_worker, self.identity.size)
        is_decode = self.identity.role is Role.DECODE
        self.loop = WorkerLoop(self.identity.worker_id, self.fingerprint, self.secret,
                               self._request_plane_host(),
                               PeerRole.DECODE if is_decode else PeerRole.PREFILL)
        if is_decode:
            return self._build_decode(options, group)
        return self._build_prefill(options, group)

    def _request_plane_host(self) -> str:
        """Where the worker's request-plane server listens: loopback when the whole cluster
        runs on this machine (``address: local``), so nothing off it can connect; else the
        node's address, which the other nodes route to."""
        if self.config.address == "local":
            return LOOPBACK
        return ray.util.get_node_ip_address()

    def _build_decode(self, options, group):
        from decode.worker import DecodeOptions, DecodeWorker
        from engine.engine import LLMEngine

        engine = LLMEngine(self.config.model_dir, self._engine_config(),
                           executor=_GroupExecutor(group), options=options)
        role = self.config.decode
        decode_options = DecodeOptions(
            self.identity.worker_id, role.disagg_mode, role.max_local_prefill_tokens,
            role.max_prefill_queue, role.max_remote_reserved_blocks,
            role.remote_prefill_timeout_s, is_lossy_wire=self.config.is_lossy_wire,
            kv_transfer_checksum=self.config.kv_transfer_checksum)
        return DecodeWorker(group, engine, decode_options, self.loop.dialer, self.probe)

    def _build_prefill(self, options, group):
        from engine.block_manager import BlockManager
        from prefill.worker import PrefillOptions, PrefillWorker

        role = self.config.prefill
        block_manager = BlockManager(options.num_blocks, options.block_size,
                                     role.enable_prefix_caching)
        prefill_options = PrefillOptions(self.identity.worker_id, role.max_num_seqs,
                                         role.max_num_batched_tokens, options.max_model_len)
        return PrefillWorker(group, block_manager, prefill_options)

    # -- rank 0's control surface ---------------------------------------------------------

    def control(self, command: Any, timeout_s: float = 60.0) -> Any:
        """Run a typed command (``pdserve.worker_commands``) on the worker's loop thread."""
        return self.loop.control(command).result(timeout_s)

    def wait_stopped(self) -> None:
        """Returns when the rank stops; raises (RayActorError) when its process dies."""
        self._stopped.wait()

    def shutdown(self) -> None:
        if self.loop is not None:
            self.loop.shutdown()
            self._stopped.set()


class _GroupExecutor:
    """The engine's executor over a rank group: every rank runs the step."""

    def __init__(self, group):
        from decode.rank import DecodeRank  # in the actor process only (torch)

        self.group = group
        self._execute = DecodeRank.execute  # resolved once, not on every engine step

    def execute(self, batch):
        return self.group.call(self._execute, batch)

    def shutdown(self) -> None:
        pass
