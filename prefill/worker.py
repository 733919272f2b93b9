"""The prefill worker: takes prefill jobs, computes their KV and streams it to decode workers.

Rank 0 runs this. Jobs arrive on the request plane and wait in a queue; each step admits
jobs while blocks and the send buffer allow, batches chunks of several jobs up to the token
budget, and during the forward pass every rank posts each layer's finished blocks. A job's
prompt prefix may come from this worker's own prefix cache; only the blocks decode lacks are
written. A job's blocks stay allocated until every rank's send has ended (the WRITEs read
them), then return to the pool, their full blocks cached.

The decode worker owns the request: a job here is only ever cancelled by decode (or failed
by the KV plane), never re-run on its own.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.model_runner import ModelInput, SequenceInput
from engine.rank_group import RankGroup
from pdserve import protocol
from pdserve.protocol import PrefillJob
from pdserve.transport import Connection, resident_bytes
from pdserve.worker_commands import AddDecode, GetStats, LoseDecode
from pdserve.worker_stats import PrefillStats
from prefill.rank import PrefillRank, Send

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.1
_SEND_WAIT_S = 0.0005


@dataclass(frozen=True, slots=True)
class PrefillOptions:
    """What a prefill worker needs of the cluster config (plain values)."""

    worker_id: str
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(slots=True)
class Job:
    """One prefill job: its message, where it came from, and how far its compute and sends
    have come."""

    msg: PrefillJob
    connection: Connection
    num_tokens: int  # tokens to compute KV for: the prompt but its last token
    first_block: int  # the first block decode lacks
    num_computed: int = 0
    next_block: int = 0  # the next block to send
    is_cancelled: bool = False
    is_failed: bool = False  # a rank's send failed (deadline, dead peer): stopped like a cancel
    is_closed: bool = False  # finish or cancel sent to every rank
    num_results: int = 0
    num_bytes: int = 0

    @property
    def request_id(self) -> str:
        return self.msg.request_id


class PrefillWorker:
    """Rank 0's prefill role, run by the cluster's worker loop (every method on its thread)."""

    def __init__(self, group: RankGroup, block_manager: BlockManager, options: PrefillOptions):
        self.group = group
        self.block_manager = block_manager
        self.options = options
        self.endpoints: list[dict] = group.gather(PrefillRank.endpoint)
        self.queue: deque[Job] = deque()
        self.active: dict[str, Job] = {}  # begun, on every rank
        self.connections: dict[int, Connection] = {}
        self.stats = {"jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0,
                      "bytes_sent": 0, "prompt_tokens_computed": 0}

    @property
    def queue_depth(self) -> int:
        return len(self.queue) + len(self.active)

    # -- the compute thread ---------------------------------------------------------------

    def iterate(self) -> None:
        self._admit()
        self._compute()
        self._collect()

    def wait_s(self) -> float:
        if self.queue or any(not j.is_closed for j in self.active.values()):
            return 0.0
        return _SEND_WAIT_S if self.active else _IDLE_WAIT_S

    def on_message(self, connection: Connection, msg: protocol.Message) -> None:
        self.connections[connection.connection_id] = connection
        if isinstance(msg, PrefillJob):
            self._enqueue(connection, msg)
        elif isinstance(msg, protocol.CancelJob):
            self._cancel(connection, msg)

    def on_close(self, connection: Connection) -> None:
        self.connections.pop(connection.connection_id, None)

    def _enqueue(self, connection: Connection, msg: PrefillJob) -> None:
        reason = self._refusal(msg)
        if not reason:
            block_size = self.block_manager.block_size
            first = msg.num_cached_tokens // block_size
            self.queue.append(Job(msg, connection, len(msg.token_ids) - 1, first,
                                  next_block=first))
            logger.debug("request %s: prefill job queued (attempt %d)", msg.request_id,
                         msg.attempt)
        connection.send(protocol.JobReply(msg.request_id, msg.attempt, not reason, reason,
                                          self.queue_depth))

    def _refusal(self, msg: PrefillJob) -> str:
        num_tokens = len(msg.token_ids) - 1
        if num_tokens < 1 or len(msg.token_ids) > self.options.max_model_len:
            return f"prompt of {len(msg.token_ids)} tokens is out of range"
        if msg.num_cached_tokens % self.block_manager.block_size:
            return f"num_cached_tokens={msg.num_cached_tokens} is not block-aligned"
        expected = (self.block_manager.num_blocks_for(num_tokens)
                    - msg.num_cached_tokens // self.block_manager.block_size)
        if len(msg.block_ids) != expected:
            return f"{len(msg.block_ids)} destination blocks, expected {expected}"
        if msg.request_id in self.active or any(j.request_id == msg.request_id
                                                for j in self.queue):
            return f"request {msg.request_id!r} already has a job here"
        return ""

    def _cancel(self, connection: Connection, msg: protocol.CancelJob) -> None:
        queued = [j for j in self.queue if j.request_id == msg.request_id
                  and j.msg.attempt == msg.attempt]
        for job in queued:
            self.queue.remove(job)
            self.stats["jobs_cancelled"] += 1
        job = self.active.get(msg.request_id)
        is_writing = job is not None and job.msg.attempt == msg.attempt
        if is_writing:  # its sends end with a notice
            job.is_cancelled = True
        # Neither queued nor active: it never started, or every rank's sends have ended (it
        # is retired only then), so nothing can land any more, even if its notice was lost.
        connection.send(protocol.CancelJobReply(msg.request_id, msg.attempt, is_writing,
                                                self.queue_depth))
        logger.debug("request %s: cancel (attempt %d), %s", msg.request_id, msg.attempt,
                     "dropped from the queue" if queued else "stopping its sends")

    def _admit(self) -> None:
        while self.queue and len(self.active) < self.options.max_num_seqs:
            job = self.queue[0]
            tokens = job.msg.token_ids
            prefix = self.block_manager.match_prefix(tokens)
            table = self.block_manager.allocate(job.request_id, job.num_tokens, prefix)
            if table is None:
                return  # blocks come back as sends end
            src_blocks = table[job.first_block:]
            began = self.group.gather(PrefillRank.begin, job.request_id, job.msg.attempt,
                                      job.msg.agents, job.msg.block_ids, src_blocks,
                                      job.msg.timeout_s)
            if not all(began):  # a rank's send buffer is short: undo on every rank
                self.group.call(PrefillRank.withdraw, job.request_id)
                self.block_manager.free(job.request_id)
                return
            self.queue.popleft()
            job.num_computed = prefix.num_tokens
            self.active[job.request_id] = job
            logger.debug("request %s: prefill job taken, %d tokens from the prefix cache",
                         job.request_id, prefix.num_tokens)

    def _compute(self) -> None:
        budget = self.options.max_num_batched_tokens
        sequences: list[SequenceInput] = []
        sends: list[Send] = []
        done: list[Job] = []
        for job in list(self.active.values()):
            if job.is_closed:
                continue
            if job.is_cancelled:
                self._close(job, PrefillRank.cancel)
                continue
            count = min(job.num_tokens - job.num_computed, budget)
            end = job.num_computed + count
            if count:
                sequences.append(SequenceInput(job.msg.token_ids[job.num_computed:end],
                                               job.num_computed,
                                               self.block_manager.block_table(job.request_id),
                                               False))
                budget -= count
            send = self._ready_blocks(job, end)
            if send is not None:
                sends.append(send)
            job.num_computed = end
            if end == job.num_tokens:
                done.append(job)
        if sequences:
            self.group.call(PrefillRank.execute, ModelInput(sequences), sends)
            self.stats["prompt_tokens_computed"] += sum(len(s.token_ids) for s in sequences)
        elif sends:  # every block came from the prefix cache
            for request_id, _, _ in sends:
                self.group.call(PrefillRank.send_all, request_id)
        for job in done:
            self.block_manager.cache_full_blocks(job.request_id, job.msg.token_ids,
                                                 job.num_tokens)
            self._close(job, PrefillRank.finish)

    def _ready_blocks(self, job: Job, end: int) -> Send | None:
        """The blocks whose KV is complete once ``end`` tokens are computed, not yet sent."""
        if end < job.num_tokens:
            ready = end // self.block_manager.block_size
        else:
            ready = self.block_manager.num_blocks_for(job.num_tokens)
        start = max(job.next_block, job.first_block)
        if ready <= start:
            return None
        job.next_block = ready
        return (job.request_id, start - job.first_block, ready - start)

    def _close(self, job: Job, how: Callable[[PrefillRank, str], None]) -> None:
        self.group.call(how, job.request_id)
        job.is_closed = True
        logger.debug("request %s: %s sent to every rank", job.request_id, how.__name__)

    def _collect(self) -> None:
        """Each rank's ended sends; a job's blocks are freed once every rank's has ended."""
        if not self.active:
            return
        has_compute = any(not j.is_closed for j in self.active.values())
        for results in self.group.gather(PrefillRank.poll, 0.0 if has_compute else _SEND_WAIT_S):
            for request_id, _attempt, ok, reason, num_bytes in results:
                job = self.active.get(request_id)
                if job is None:
                    continue
                job.num_results += 1
                job.num_bytes += num_bytes
                if not ok and not job.is_closed:
                    logger.info("request %s: send failed (%s)", request_id, reason)
                    job.is_cancelled = job.is_failed = True
        for job in [j for j in self.active.values()
                    if j.is_closed and j.num_results == self.group.size]:
            self._retire(job)

    def _retire(self, job: Job) -> None:
        del self.active[job.request_id]
        self.block_manager.free(job.request_id)
        self.stats["bytes_sent"] += job.num_bytes
        kind = ("jobs_failed" if job.is_failed else
                "jobs_cancelled" if job.is_cancelled else "jobs_done")
        self.stats[kind] += 1
        logger.debug("request %s: prefill job ended (%s, %d bytes)", job.request_id, kind,
                     job.num_bytes)
        depth = protocol.QueueDepth(self.queue_depth)
        for connection in self.connections.values():
            connection.send(depth)

    # -- control --------------------------------------------------------------------------

    def control(self, command: AddDecode | LoseDecode | GetStats) -> PrefillStats | None:
        if isinstance(command, AddDecode):
            self.group.call(PrefillRank.add_peers, command.endpoints)
        elif isinstance(command, LoseDecode):
            self._lose_decode(command.agent_names)
        elif isinstance(command, GetStats):
            return self._stats()
        else:
            raise ValueError(f"a prefill worker does not take {type(command).__name__}")
        return None

    def close(self) -> None:
        self.group.stop()
        self.group.worker.close()

    def _lose_decode(self, agent_names: list[str]) -> None:
        lost = set(agent_names)
        for job in [j for j in self.queue if lost & set(j.msg.agents)]:
            self.queue.remove(job)
        self.group.call(PrefillRank.remove_peers, agent_names)

    def _stats(self) -> PrefillStats:
        return PrefillStats(
            **self.stats, worker_id=self.options.worker_id, queue_depth=self.queue_depth,
            num_active=len(self.active), num_free_blocks=self.block_manager.num_free_blocks,
            num_blocks=self.block_manager.num_blocks, num_connections=len(self.connections),
            rss_bytes=resident_bytes(), ranks=self.group.gather(PrefillRank.counts))
