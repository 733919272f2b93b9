"""KV-aware choice of a decode worker: which worker already holds a prompt's prefix.

Each decode worker publishes its prefix cache as a snapshot as of sequence number ``seq``,
then event batches numbered on from there, one number per event (``decode/events.py``). The
index mirrors every worker's set of block hashes from them and scores a prompt's block-hash
chain (``pdserve.hashing.hash_blocks``) against each candidate::

    cost = weight * blocks_to_prefill + active_decode_blocks

``blocks_to_prefill`` is the number of prompt blocks past the longest prefix of the chain the
worker holds (a prefix cache matches from the first block and stops at the first miss).
``active_decode_blocks`` is the router's own count of blocks held by the requests it has in
flight on that worker: exact for what it sent, where a worker's ``Load`` lags behind.

Sequence numbers, as seen by one worker's mirror (``next_seq`` = the next event expected)::

    batch [seq_start, seq_start + len)   vs next_seq   ->  action
    ends at or before next_seq                         ->  duplicate: skipped
    starts before, ends after                          ->  overlap: only the new part applied
    starts at next_seq                                 ->  applied
    starts after next_seq                              ->  gap: unsynced until a new snapshot

Messages from workers not in the index are ignored (they can arrive after ``remove_worker``);
the router's own calls naming an unknown worker (``choose``, ``start_request``, queries) are
caller bugs and raise ``ValueError``. Pure Python, no I/O; runs on the router's event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pdserve.hashing import hash_blocks
from pdserve.protocol import KVEventKind, KVEvents, KVSnapshot, Load


class WorkerScore(NamedTuple):
    """One candidate's score for one prompt: lower ``cost`` wins."""

    cost: float
    blocks_to_prefill: int
    active_blocks: int


@dataclass(slots=True)
class _Worker:
    order: int  # registration order: the last tie-break
    # Held hashes, oldest stored first (the values are unused).
    hashes: OrderedDict[int, None] = field(default_factory=OrderedDict)
    next_seq: int = 0
    is_synced: bool = False
    load: Load | None = None
    request_ids: set[str] = field(default_factory=set)
    active_blocks: int = 0
    last_chosen: int = -1  # number of the choice that last picked it; -1 = never


@dataclass(slots=True)
class _Request:
    worker_id: str
    num_blocks: int


class KVIndex:
    """Mirrors the decode workers' prefix caches and picks the cheapest worker for a prompt.

    At most ``max_blocks_per_worker`` hashes are kept per worker, oldest stored dropped first.
    A worker's cache cannot hold more blocks than its pool, so with the bound at least the
    pool size this only bites when ``removed`` events were lost, and keeps the mirror from
    growing without end until the next snapshot.
    """

    def __init__(self, block_size: int, weight: float, max_blocks_per_worker: int):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: must be >= 1")
        if not weight >= 0:
            raise ValueError(f"weight={weight} is invalid: must be >= 0 (0 = load only)")
        if max_blocks_per_worker < 1:
            raise ValueError(
                f"max_blocks_per_worker={max_blocks_per_worker} is invalid: must be >= 1")
        self.block_size = block_size
        self.weight = weight
        self.max_blocks_per_worker = max_blocks_per_worker
        self._workers: dict[str, _Worker] = {}
        self._requests: dict[str, _Request] = {}
        self._num_registered = 0
        self._num_choices = 0

    # -- workers and their messages ---------------------------------------------------------

    @property
    def worker_ids(self) -> list[str]:
        return list(self._workers)

    def add_worker(self, worker_id: str) -> None:
        """A new worker, unsynced and holding nothing until its first snapshot."""
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already in the KV index; "
                             "remove_worker it before adding it again")
        self._workers[worker_id] = _Worker(order=self._num_registered)
        self._num_registered += 1

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker and its in-flight requests; a no-op for an unknown worker."""
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            for request_id in worker.request_ids:
                del self._requests[request_id]

    def apply_snapshot(self, msg: KVSnapshot) -> None:
        """Replace the worker's hashes; events are expected from ``msg.seq`` on."""
        worker = self._workers.get(msg.worker_id)
        if worker is None:
            return
        hashes = list(dict.fromkeys(msg.block_hashes))[-self.max_blocks_per_worker:]
        worker.hashes = OrderedDict.fromkeys(hashes)
        worker.next_seq = msg.seq
        worker.is_synced = True

    def apply_events(self, msg: KVEvents) -> bool:
        """Apply a batch's new events; ``False`` on a gap, when the caller must resubscribe.

        After a gap the worker is unsynced and its batches are ignored (answering ``True``:
        a snapshot is already on its way) until the snapshot arrives. Meanwhile its last
        known hashes still score, being at worst a few events stale.
        """
        worker = self._workers.get(msg.worker_id)
        if worker is None or not worker.is_synced:
            return True
        if msg.seq_start > worker.next_seq:
            worker.is_synced = False
            return False
        for event in msg.events[worker.next_seq - msg.seq_start:]:  # kinds typed on decode
            if event.kind is KVEventKind.STORED:
                self._store(worker, event.block_hash)
            else:
                worker.hashes.pop(event.block_hash, None)
        worker.next_seq = max(worker.next_seq, msg.seq_start + len(msg.events))
        return True

    def apply_load(self, msg: Load) -> None:
        worker = self._workers.get(msg.worker_id)
        if worker is not None:
            worker.load = msg

    def _store(self, worker: _Worker, block_hash: int) -> None:
        worker.hashes[block_hash] = None
        worker.hashes.move_to_end(block_hash)  # stored again: newest
        if len(worker.hashes) > self.max_blocks_per_worker:
            worker.hashes.popitem(last=False)

    # -- the router's own requests ----------------------------------------------------------

    def start_request(self, worker_id: str, request_id: str, num_tokens: int) -> None:
        """Count a request just sent to ``worker_id`` holding ``num_tokens`` tokens of KV."""
        worker = self._worker(worker_id)
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in flight on worker "
                             f"{self._requests[request_id].worker_id!r}")
        num_blocks = self._num_blocks(num_tokens)
        self._requests[request_id] = _Request(worker_id, num_blocks)
        worker.request_ids.add(request_id)
        worker.active_blocks += num_blocks

    def update_request(self, request_id: str, num_tokens: int) -> None:
        """The request now holds ``num_tokens``; a no-op once it finished or its worker left."""
        request = self._requests.get(request_id)
        if request is None:
            return
        num_blocks = self._num_blocks(num_tokens)
        self._workers[request.worker_id].active_blocks += num_blocks - request.num_blocks
        request.num_blocks = num_blocks

    def finish_request(self, request_id: str) -> None:
        """Stop counting the request; a no-op when it is not in flight."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        worker = self._workers[request.worker_id]
        worker.request_ids.remove(request_id)
        worker.active_blocks -= request.num_blocks

    def _num_blocks(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} is invalid: must be >= 0")
        return -(-num_tokens // self.block_size)

    # -- scoring ----------------------------------------------------------------------------

    def hash_prompt(self, token_ids: Sequence[int]) -> list[int]:
        """The prompt's full-block hash chain, as the workers compute it."""
        return hash_blocks(token_ids, self.block_size)

    def blocks_to_prefill(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """Prompt blocks past the longest prefix of ``block_hashes`` the worker holds."""
        held = self._worker(worker_id).hashes
        num_matched = 0
        for block_hash in block_hashes:
            if block_hash not in held:
                break
            num_matched += 1
        return len(block_hashes) - num_matched

    def scores(self, block_hashes: Sequence[int],
               candidates: Sequence[str]) -> dict[str, WorkerScore]:
        """Each candidate's score, in the order given."""
        result = {}
        for worker_id in candidates:
            num_to_prefill = self.blocks_to_prefill(worker_id, block_hashes)
            active_blocks = self._workers[worker_id].active_blocks
            result[worker_id] = WorkerScore(self.weight * num_to_prefill + active_blocks,
                                            num_to_prefill, active_blocks)
        return result

    def choose(self, block_hashes: Sequence[int], candidates: Sequence[str]) -> str:
        """The candidate of lowest cost.

        Ties go to fewer in-flight requests, then to the one chosen least recently (never
        chosen first, in order of ``add_worker``), so equal workers take turns.
        """
        if not candidates:
            raise ValueError("choose needs at least one candidate worker")
        scores = self.scores(block_hashes, candidates)

        def rank(worker_id: str) -> tuple[float, int, int, int]:
            worker = self._workers[worker_id]
            return (scores[worker_id].cost, len(worker.request_ids), worker.last_chosen,
                    worker.order)

        best = min(candidates, key=rank)
        self._num_choices += 1
        self._workers[best].last_chosen = self._num_choices
        return best

    # -- queries for tests and metrics ------------------------------------------------------

    def is_synced(self, worker_id: str) -> bool:
        return self._worker(worker_id).is_synced

    def load(self, worker_id: str) -> Load | None:
        """The worker's latest ``Load``, ``None`` before the first."""
        return self._worker(worker_id).load

    def cached_hashes(self, worker_id: str) -> list[int]:
        """The hashes the index holds for the worker, oldest stored first."""
        return list(self._worker(worker_id).hashes)

    def num_cached_blocks(self, worker_id: str) -> int:
        return len(self._worker(worker_id).hashes)

    @property
    def num_cached_entries(self) -> int:
        """Hashes held over all workers: the index's memory."""
        return sum(len(worker.hashes) for worker in self._workers.values())

    def num_active_blocks(self, worker_id: str) -> int:
        return self._worker(worker_id).active_blocks

    def num_in_flight(self, worker_id: str) -> int:
        return len(self._worker(worker_id).request_ids)

    def _worker(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise ValueError(f"worker {worker_id!r} is not in the KV index "
                             f"(known: {sorted(self._workers)}); add_worker it first")
        return worker
