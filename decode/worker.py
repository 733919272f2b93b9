"""The decode worker: owns requests, decides where each prefill runs, decodes them all.

Rank 0 runs this. Its engine loop runs in its own thread; the request plane (a uvloop
thread) only queues what arrives into the loop's inbox, and the loop sends token chunks
back. A request's life on the remote path (DESIGN.md steps 3-6)::

    Generate -> match prefix -> decide -> REMOTE: blocks for the uncached part, expect,
    PrefillJob -> WAITING_FOR_REMOTE_KV (never scheduled, never preempted)
        LANDED   -> verify the digests (kv_transfer_checksum), a mismatch: prefill again
                    locally into fresh blocks, the old ones freed at once (every sender is
                    done) -> finish (dequantize staging) -> run the last prompt token here
        FAILED / deadline / prefill gone / cancel
                 -> CancelJob; the blocks move to a stale owner; prefill again locally into
                    fresh blocks (or finish, when the client cancelled)
        RELEASED -> no write can land any more: free the stale blocks
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field

from decode.decision import DecisionPolicy, Where
from decode.events import EventPublisher
from decode.rank import DecodeRank
from engine.engine import LLMEngine
from engine.rank_group import RankGroup
from engine.request import Request
from kvtransfer.checksum import Mismatch
from kvtransfer.consumer import EventKind
from pdserve import protocol
from pdserve.choices import DisaggMode, KVChecksum
from pdserve.probe import Probe
from pdserve.protocol import FinishReason
from pdserve.transport import Connection, Dialer, resident_bytes
from pdserve.worker_commands import AddPrefill, GetStats, LosePrefill, agent_names
from pdserve.worker_stats import DecodeStats, PrefillCounts

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.1  # nothing to do: wake only to notice a stop
_TRANSFER_WAIT_S = 0.0005  # waiting on KV notices, which arrive without a wake-up


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """What a decode worker needs of the cluster config (plain values, DESIGN.md step 3)."""

    worker_id: str
    disagg_mode: DisaggMode
    max_local_prefill_tokens: int
    max_prefill_queue: int
    max_remote_reserved_blocks: int | None
    remote_prefill_timeout_s: float
    is_lossy_wire: bool  # fp8 wire into a model-dtype pool: landed blocks are not cached
    kv_transfer_checksum: KVChecksum = KVChecksum.OFF  # off: landed KV is not verified


@dataclass(slots=True)
class PrefillPeer:
    """A prefill worker this decode worker may send jobs to."""

    prefill_id: str
    agents: list[str]  # its NIXL agents by TP rank
    connection: Connection
    queue_depth: int = 0
    is_healthy: bool = True


@dataclass(slots=True)
class RemotePrefill:
    """A request whose KV a prefill worker is writing: which attempt, where, how much."""

    request: Request
    attempt: int
    prefill_id: str
    num_blocks: int


@dataclass(slots=True)
class Counters:
    """What the worker counts for its stats."""

    prefills: Counter = field(default_factory=Counter)  # local / remote / fallback
    prompt_tokens_computed: int = 0
    num_finished: int = 0
    checksum_failures: int = 0  # remote KV that landed but failed its digests


class DecodeWorker:
    """Rank 0's decode role, run by the cluster's worker loop (every method on its thread)."""

    def __init__(self, group: RankGroup, engine: LLMEngine, options: DecodeOptions,
                 dialer: Dialer, probe: Probe | None = None):
        self.group = group
        self.rank0: DecodeRank = group.worker
        self.engine = engine
        self.options = options
        self.dialer = dialer
        self.probe = probe or Probe()
        self.endpoints: list[dict] = group.gather(DecodeRank.endpoint)
        self.agents: list[str] = agent_names(self.endpoints)
        self.policy = DecisionPolicy(options.disagg_mode, options.max_local_prefill_tokens,
                                     options.max_prefill_queue,
                                     options.max_remote_reserved_blocks)
        self.counters = Counters()
        self.streams: dict[str, Connection] = {}
        self.prefills: dict[str, PrefillPeer] = {}
        self.remote: dict[str, RemotePrefill] = {}
        # request id -> (owner of its parked blocks, the attempt they were parked for)
        self.stale: dict[str, tuple[str, int]] = {}
        # Attempt numbers are unique across requests, so no notice can ever match the
        # wrong attempt, and nothing per request outlives it.
        self._attempts = itertools.count(1)
        self.events = EventPublisher(options.worker_id, engine)

    # -- the engine thread ----------------------------------------------------------------

    def iterate(self) -> None:
        self._poll_kv()
        self._step()
        self.events.publish()

    def wait_s(self) -> float:
        scheduler = self.engine.scheduler
        if scheduler.running or scheduler.waiting:
            return 0.0
        return _TRANSFER_WAIT_S if (self.remote or self.stale) else _IDLE_WAIT_S

    def on_message(self, connection: Connection, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Generate):
            self._generate(connection, msg)
        elif isinstance(msg, protocol.Cancel):
            self._abort(msg.request_id, "cancelled by the client")
        elif isinstance(msg, protocol.Subscribe):
            self.events.subscribe(connection)
        elif isinstance(msg, protocol.JobReply):
            self._job_reply(connection.peer, msg)
        elif isinstance(msg, protocol.CancelJobReply):
            self._set_depth(connection.peer, msg.queue_depth)
            parked = self.stale.get(msg.request_id)
            if not msg.is_writing and parked is not None and parked[1] == msg.attempt:
                self.rank0.consumer.release(msg.request_id)
        elif isinstance(msg, protocol.QueueDepth):
            self._set_depth(connection.peer, msg.queue_depth)
        elif isinstance(msg, protocol.Error):
            logger.warning("peer %s reported: %s", connection.peer, msg.message)

    # -- requests -------------------------------------------------------------------------

    def _generate(self, connection: Connection, msg: protocol.Generate) -> None:
        request_id = msg.request_id
        if request_id in self.stale:  # (the engine refuses ids it is running)
            connection.send(protocol.TokenChunk(request_id, [], True, None,
                                                f"request_id {request_id!r} is in use"))
            return
        try:
            self.engine.add_request(msg.prompt_token_ids, msg.sampling, request_id)
        except ValueError as error:
            connection.send(protocol.TokenChunk(request_id, [], True, None, str(error)))
            return
        self.streams[request_id] = connection
        request = self.engine.scheduler.requests[request_id]
        logger.debug("request %s: queued, %d prompt tokens", request_id, request.num_tokens)
        self._route(request)

    def _route(self, request: Request) -> None:
        block_manager = self.engine.block_manager
        num_tokens = request.num_tokens
        num_cached = block_manager.match_prefix(request.all_token_ids).num_tokens
        num_to_send = block_manager.num_blocks_for(num_tokens - 1) - \
            num_cached // block_manager.block_size
        peer = self._least_loaded_prefill()
        decision = self.policy.decide(num_tokens - num_cached, num_to_send,
                                      peer.queue_depth if peer else None,
                                      sum(r.num_blocks for r in self.remote.values()))
        logger.debug("request %s: decision %s (%s), %d of %d tokens cached",
                     request.request_id, decision.where.value, decision.reason.value,
                     num_cached, num_tokens)
        if decision.where is Where.REMOTE and self._go_remote(request, peer):
            self.counters.prefills["remote"] += 1
        else:
            self.counters.prefills["local"] += 1

    def _least_loaded_prefill(self) -> PrefillPeer | None:
        healthy = [p for p in self.prefills.values() if p.is_healthy]
        return min(healthy, key=lambda p: p.queue_depth) if healthy else None

    def _go_remote(self, request: Request, peer: PrefillPeer) -> bool:
        request_id = request.request_id
        block_ids = self.engine.scheduler.allocate_for_remote_kv(request)
        if block_ids is None:
            return False
        first = request.num_cached_tokens // self.engine.block_manager.block_size
        pool_blocks = block_ids[first:]
        attempt = next(self._attempts)
        timeout_s = self.options.remote_prefill_timeout_s
        targets = self.group.call(DecodeRank.expect, request_id, attempt, pool_blocks,
                                  peer.agents, timeout_s)
        if targets is None:  # staging is short: prefill here after all
            self.engine.scheduler.take_back_remote(request_id, request_id + "#none")
            self.engine.block_manager.free(request_id + "#none")
            return False
        peer.connection.send(protocol.PrefillJob(
            request_id, attempt, request.prompt_token_ids, request.num_cached_tokens,
            self.agents, targets, timeout_s))
        peer.queue_depth += 1
        self.remote[request_id] = RemotePrefill(request, attempt, peer.prefill_id,
                                                len(pool_blocks))
        return True

    def _poll_kv(self) -> None:
        if not (self.remote or self.stale):
            return
        for event in self.rank0.consumer.poll():
            if event.kind is EventKind.LANDED:
                self._landed(event.request_id)
            elif event.kind is EventKind.FAILED:
                self._fall_back(event.request_id, event.reason)
            else:
                self._released(event.request_id)

    def _landed(self, request_id: str) -> None:
        mismatches = self._verify(request_id)
        if mismatches:
            self._reject(request_id, mismatches)
            return
        remote = self.remote.pop(request_id)
        self.group.call(DecodeRank.finish_kv, request_id, True)
        if self.options.is_lossy_wire:
            remote.request.is_cacheable = False
        self.engine.scheduler.remote_kv_landed(request_id)
        logger.debug("request %s: remote KV landed (attempt %d)", request_id, remote.attempt)

    def _verify(self, request_id: str) -> list[Mismatch]:
        """Every rank checks the wire bytes that landed on it against the senders' digests."""
        if self.options.kv_transfer_checksum is KVChecksum.OFF:
            return []
        digests = self.rank0.consumer.digests(request_id)
        if not digests:  # the senders computed none
            return []
        return [m for rank in self.group.gather(DecodeRank.verify_kv, request_id, digests)
                for m in rank]

    def _reject(self, request_id: str, mismatches: list[Mismatch]) -> None:
        """The KV landed corrupt: prefill locally into fresh blocks, as after a failed
        transfer. Every sender reported DONE, so no write can land: free the blocks now."""
        remote = self.remote.pop(request_id)
        self.group.call(DecodeRank.finish_kv, request_id, False)
        owner = f"{request_id}#attempt{remote.attempt}"
        self.engine.scheduler.take_back_remote(request_id, owner)
        self.engine.block_manager.free(owner)
        self.counters.prefills["fallback"] += 1
        self.counters.checksum_failures += 1
        first = mismatches[0]
        digest = first.digest
        logger.warning("request %s: KV checksum mismatch on decode worker %s rank %d, layer %d, "
                       "block %d (position %d) from prefill worker %s rank %d (%d digests "
                       "failed); prefilling locally", request_id, self.options.worker_id,
                       digest.dst_rank, digest.layer, first.block_id, digest.position,
                       remote.prefill_id, digest.src_rank, len(mismatches))

    def _fall_back(self, request_id: str, reason: str, requeue: bool = True) -> None:
        """Give up on the remote prefill: cancel it, park its blocks until RELEASED."""
        remote = self.remote.pop(request_id)
        self.rank0.consumer.cancel(request_id)
        peer = self.prefills.get(remote.prefill_id)
        if peer is not None and peer.is_healthy:
            peer.connection.send(protocol.CancelJob(request_id, remote.attempt))
        owner = f"{request_id}#attempt{remote.attempt}"
        self.stale[request_id] = (owner, remote.attempt)
        self.engine.scheduler.take_back_remote(request_id, owner)
        if requeue:
            self.counters.prefills["fallback"] += 1
            logger.info("request %s: remote prefill failed (%s); prefilling locally",
                        request_id, reason)

    def _released(self, request_id: str) -> None:
        parked = self.stale.pop(request_id, None)
        if parked is None:
            raise RuntimeError(f"RELEASED for request {request_id!r} that is not parked")
        self.group.call(DecodeRank.finish_kv, request_id, False)
        self.engine.block_manager.free(parked[0])

    def _abort(self, request_id: str, reason: str) -> None:
        if request_id in self.remote:
            self._fall_back(request_id, reason, requeue=False)
        if self.engine.abort_request(request_id):
            connection = self.streams.pop(request_id, None)
            if connection is not None:
                connection.send(protocol.TokenChunk(request_id, [], True, FinishReason.ABORT))
            logger.debug("request %s: aborted (%s)", request_id, reason)

    def _step(self) -> None:
        for output in self.engine.step():
            connection = self.streams.get(output.request_id)
            if len(output.token_ids) == 1:
                logger.debug("request %s: first token", output.request_id)
            if output.finished:
                self.streams.pop(output.request_id, None)
                self.counters.num_finished += 1
                self.counters.prompt_tokens_computed += output.num_prompt_tokens_computed
                logger.debug("request %s: finished (%s)", output.request_id,
                             output.finish_reason)
            if connection is not None:
                connection.send(protocol.TokenChunk(
                    output.request_id, output.new_token_ids, output.finished,
                    output.finish_reason, "", output.num_cached_tokens))
            self.probe.after_output(output.request_id, len(output.token_ids))

    # -- prefill workers ------------------------------------------------------------------

    def _job_reply(self, prefill_id: str, msg: protocol.JobReply) -> None:
        self._set_depth(prefill_id, msg.queue_depth)
        remote = self.remote.get(msg.request_id)
        if msg.accepted or remote is None or remote.attempt != msg.attempt:
            return
        self.rank0.consumer.release(msg.request_id)  # refused: nothing will be written
        self._fall_back(msg.request_id, f"job refused: {msg.reason}")

    def _set_depth(self, prefill_id: str, depth: int) -> None:
        if prefill_id in self.prefills:
            self.prefills[prefill_id].queue_depth = depth

    def on_close(self, connection: Connection) -> None:
        for request_id in [r for r, c in self.streams.items() if c is connection]:
            self._abort(request_id, "client disconnected")
        self.events.unsubscribe(connection)
        peer = self.prefills.get(connection.peer)
        if peer is not None and peer.connection is connection:
            self._prefill_gone(peer, "its connection closed")

    def _prefill_gone(self, peer: PrefillPeer, reason: str) -> None:
        """Send it nothing more; its jobs fall back now. Their blocks stay parked until it
        is declared dead and its agents removed (``lose_prefill``)."""
        peer.is_healthy = False
        for request_id in [r for r, rp in self.remote.items()
                           if rp.prefill_id == peer.prefill_id]:
            self._fall_back(request_id, f"prefill worker {peer.prefill_id}: {reason}")

    # -- control (from the cluster) -------------------------------------------------------

    def control(self, command: AddPrefill | LosePrefill | GetStats) -> DecodeStats | None:
        if isinstance(command, AddPrefill):
            self._add_prefill(command)
        elif isinstance(command, LosePrefill):
            self._lose_prefill(command.prefill_id)
        elif isinstance(command, GetStats):
            return self._stats()
        else:
            raise ValueError(f"a decode worker does not take {type(command).__name__}")
        return None

    def close(self) -> None:
        self.group.stop()
        self.rank0.close()

    def _add_prefill(self, command: AddPrefill) -> None:
        self.group.call(DecodeRank.add_peers, command.endpoints)
        connection = self.dialer.connect(command.host, command.port)
        self.prefills[command.prefill_id] = PrefillPeer(
            command.prefill_id, agent_names(command.endpoints), connection)

    def _lose_prefill(self, prefill_id: str) -> None:
        peer = self.prefills.pop(prefill_id, None)
        if peer is None:
            return
        self._prefill_gone(peer, "declared dead")
        peer.connection.close()
        self.group.call(DecodeRank.remove_peers, peer.agents)

    def _stats(self) -> DecodeStats:
        scheduler, block_manager = self.engine.scheduler, self.engine.block_manager
        prefills = self.counters.prefills
        return DecodeStats(
            worker_id=self.options.worker_id,
            decisions={f"{w}:{r}": n for (w, r), n in self.policy.counts.items()},
            prefills=PrefillCounts(prefills["local"], prefills["remote"],
                                   prefills["fallback"]),
            prompt_tokens_computed=self.counters.prompt_tokens_computed,
            num_finished=self.counters.num_finished,
            checksum_failures=self.counters.checksum_failures,
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_waiting_for_remote_kv=len(scheduler.waiting_for_remote_kv),
            num_remote=len(self.remote), num_stale=len(self.stale),
            num_streams=len(self.streams),
            num_free_blocks=block_manager.num_free_blocks, num_blocks=block_manager.num_blocks,
            max_model_len=self.engine.max_model_len,
            ranks=self.group.gather(DecodeRank.counts),
            prefill_peers={p.prefill_id: p.is_healthy for p in self.prefills.values()},
            num_subscribers=len(self.events.subscribers), rss_bytes=resident_bytes())
