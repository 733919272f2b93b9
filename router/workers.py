"""The request-plane client: links to decode workers, on one event loop.

The router runs it on its event loop, and the cluster's synchronous facade
(``cluster.client``) on a loop thread of its own. Each link is a connection that carries
``Generate``/``Cancel`` out and token chunks, KV events and load back; the KV events feed the
``KVIndex`` that picks a worker. When a link closes, a request that has not produced a token
yet is sent to another worker (nothing was streamed, so nothing is lost). One that has is
migrated: another worker gets its prompt plus every token already received as its prompt,
``max_tokens`` less those, and ``output_offset`` = their count, so a seeded request samples
exactly as it would have (engine/sampler.py) and greedy is exact by construction. Its chunks
keep arriving on the same handle, so the stream goes on with no gap and no duplicate. Stop
strings and usage live above, in the router, and see one stream. After ``max_migrations``
moves, or with no worker left, the request ends with an error chunk.

On the wire a request goes by its ``X-Request-Id``, unless that id is still in use here:
running, or cancelled and not yet confirmed by its worker's last chunk (a client retrying
with the same id). Then it gets a suffix, so no chunk of the old request can reach the new.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from pdserve import protocol
from pdserve.cluster_handle import WorkerAddress
from pdserve.hashing import hash_blocks
from pdserve.protocol import Fingerprint, FinishReason, PeerRole, TokenChunk
from pdserve.sampling import SamplingParams
from pdserve.transport import Connection, open_connection
from router.kv_index import KVIndex

logger = logging.getLogger(__name__)

_ADD_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)


class ChunkSink(Protocol):
    """Where a request's ``(received_s, TokenChunk)`` pairs go: an ``asyncio.Queue`` on the
    router's loop, a ``queue.SimpleQueue`` for a caller on another thread."""

    def put_nowait(self, item: tuple[float, TokenChunk]) -> None: ...


@dataclass(slots=True)
class Link:
    """One decode worker's connection, and whether its KV snapshot has arrived."""

    worker_id: str
    connection: Connection
    is_synced: bool = False  # its KV snapshot has arrived: it is ready for requests
    synced: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(slots=True)
class RequestHandle:
    """One request on a worker: ``(received_s, TokenChunk)`` pairs arrive on ``chunks``
    (perf_counter time of arrival at the router); the last chunk has ``finished``."""

    request_id: str  # the client's
    wire_id: str  # the request plane's
    generate: protocol.Generate  # as sent to its current worker
    block_hashes: list[int]
    worker_id: str = ""
    submitted_s: float = 0.0  # when Generate went out on the request plane
    num_tokens_received: int = 0
    num_shared_tokens: int = 0  # prompt tokens its worker held cached when it was sent
    is_done: bool = False
    chunks: ChunkSink = field(default_factory=asyncio.Queue)
    first: protocol.Generate | None = None  # as the client asked it (None: = generate)
    output_token_ids: list[int] = field(default_factory=list)  # every token received
    num_migrations: int = 0
    num_replayed_tokens: int = 0  # output tokens its current worker got as prompt

    @property
    def original(self) -> protocol.Generate:
        return self.first or self.generate


class NoWorker(Exception):
    """No decode worker is connected and ready."""


class DecodeLinks:
    """Links to every decode worker, the requests running on them, and the KV index that
    chooses where the next one goes."""

    def __init__(self, fingerprint: Fingerprint, secret: str, index: KVIndex,
                 role: PeerRole = PeerRole.ROUTER, max_migrations: int = 3,
                 max_unsent_chunks: int | None = None,
                 on_slow_reader: Callable[[], None] | None = None):
        self.fingerprint, self.secret, self.role = fingerprint, secret, role
        self.index = index
        self.max_migrations = max_migrations
        # a request with this many chunks waiting for its reader is cancelled (None: no cap)
        self.max_unsent_chunks = max_unsent_chunks
        self.on_slow_reader = on_slow_reader
        self.links: dict[str, Link] = {}
        self.requests: dict[str, RequestHandle] = {}  # by wire id
        self.retired: dict[str, str] = {}  # cancelled wire id -> its worker, until confirmed
        self.num_resubmitted = 0  # moved before their first token
        self.num_migrations = 0  # moved with tokens, replayed on another worker
        self.num_migrated_tokens = 0  # the output tokens those replays carried
        self._suffixes = itertools.count(1)
        self._is_closing = False  # links closed on purpose: not a lost worker

    @property
    def ready_workers(self) -> list[str]:
        return sorted(w for w, link in self.links.items() if link.is_synced)

    def handle(self, request_id: str) -> RequestHandle | None:
        """The running request the client calls ``request_id`` (tests, debugging)."""
        return next((h for h in self.requests.values() if h.request_id == request_id), None)

    async def add(self, worker: WorkerAddress, timeout_s: float = 60.0) -> None:
        """Connect and subscribe; returns once the worker's KV snapshot is in the index."""
        worker_id = worker.worker_id
        if worker_id in self.links:
            return
        connection = await open_connection(worker.host, worker.port, self.role,
                                           self.fingerprint, self.secret, self._on_message,
                                           self._on_close)
        link = Link(worker_id, connection)
        self.index.add_worker(worker_id)
        self.links[worker_id] = link
        connection.send(protocol.Subscribe())
        try:
            await asyncio.wait_for(asyncio.shield(link.synced), timeout_s)
        except BaseException:
            connection.close()
            raise
        logger.info("router: linked to %s at %s:%d", worker_id, worker.host, worker.port)

    async def add_with_retry(self, worker: WorkerAddress) -> None:
        """``add``, retried with backoff: a worker that just started may still be settling."""
        worker_id = worker.worker_id
        for attempt, backoff_s in enumerate((*_ADD_RETRY_S, None)):
            try:
                await self.add(worker)
                return
            except (OSError, asyncio.TimeoutError, protocol.ProtocolError) as error:
                if backoff_s is None:
                    logger.error("router: giving up on %s after %d attempts: %s", worker_id,
                                 attempt + 1, error)
                    return
                logger.warning("router: cannot link to %s (%s); retrying in %.1f s",
                               worker_id, error, backoff_s)
                await asyncio.sleep(backoff_s)

    def remove(self, worker_id: str) -> None:
        link = self.links.get(worker_id)
        if link is not None:
            link.connection.close()  # _on_close moves or fails its requests

    def close(self) -> None:
        self._is_closing = True
        for link in list(self.links.values()):
            link.connection.close()

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
               priority: int, block_hashes: list[int], chunks: ChunkSink | None = None,
               worker_id: str | None = None) -> RequestHandle:
        """Send to the cheapest ready worker (or to ``worker_id``); ``NoWorker`` when none
        is ready."""
        wire_id = request_id
        if wire_id in self.requests or wire_id in self.retired:
            wire_id = f"{request_id}#{next(self._suffixes)}"
        handle = RequestHandle(request_id, wire_id, protocol.Generate(
            wire_id, prompt_token_ids, sampling, priority), block_hashes)
        if chunks is not None:
            handle.chunks = chunks
        self._send(handle, only=worker_id)
        self.requests[wire_id] = handle
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stop the request on its worker (which cancels its remote prefill and frees its
        blocks); its remaining chunks are dropped."""
        if handle.is_done:
            return
        self._forget(handle)
        link = self.links.get(handle.worker_id)
        if link is not None:
            self.retired[handle.wire_id] = handle.worker_id
            link.connection.send(protocol.Cancel(handle.wire_id))

    def stop(self, handle: RequestHandle) -> None:
        """Ask the worker to stop the request but keep reading it: its last chunk (``abort``,
        or ``stop``/``length`` when it finished first) still arrives on the handle."""
        link = self.links.get(handle.worker_id)
        if not handle.is_done and link is not None:
            link.connection.send(protocol.Cancel(handle.wire_id))

    def finish(self, handle: RequestHandle) -> None:
        self._forget(handle)

    def _forget(self, handle: RequestHandle) -> None:
        if not handle.is_done:
            handle.is_done = True
            self.requests.pop(handle.wire_id, None)
            self.index.finish_request(handle.wire_id)

    def _send(self, handle: RequestHandle, exclude: str = "", only: str | None = None) -> None:
        candidates = [w for w in self.ready_workers if w != exclude and only in (None, w)]
        if not candidates:
            raise NoWorker(f"decode worker {only} is not ready" if only
                           else "no decode worker is ready")
        worker_id = self.index.choose(handle.block_hashes, candidates)
        self.links[worker_id].connection.send(handle.generate)  # raises before it writes
        handle.submitted_s = time.perf_counter()
        handle.worker_id = worker_id
        # Blocks the worker already holds are shared, not added by this request.
        num_cached_blocks = len(handle.block_hashes) - self.index.blocks_to_prefill(
            worker_id, handle.block_hashes)
        handle.num_shared_tokens = num_cached_blocks * self.index.block_size
        self.index.start_request(worker_id, handle.wire_id, self._active_tokens(handle))

    def _active_tokens(self, handle: RequestHandle) -> int:
        new_tokens = handle.num_tokens_received - handle.num_replayed_tokens
        return len(handle.generate.prompt_token_ids) + new_tokens - handle.num_shared_tokens

    # -- from the workers (on the loop) ---------------------------------------------------

    def _on_message(self, connection: Connection, msg) -> None:
        if isinstance(msg, TokenChunk):
            self._on_chunk(msg)
        elif isinstance(msg, protocol.KVEvents):
            if msg.worker_id in self.links and not self.index.apply_events(msg):
                logger.info("router: gap in %s's KV events; taking a snapshot", msg.worker_id)
                connection.send(protocol.Subscribe())
        elif isinstance(msg, protocol.KVSnapshot):
            link = self.links.get(msg.worker_id)
            if link is not None:
                self.index.apply_snapshot(msg)
                link.is_synced = True
                if not link.synced.done():
                    link.synced.set_result(None)
        elif isinstance(msg, protocol.Load):
            if msg.worker_id in self.links:
                self.index.apply_load(msg)
        elif isinstance(msg, protocol.Error):
            logger.warning("router: %s reported: %s", connection.peer, msg.message)

    def _on_chunk(self, msg: TokenChunk) -> None:
        handle = self.requests.get(msg.request_id)
        if handle is None:  # cancelled: drop the rest; the last one confirms the cancel
            if msg.finished:
                self.retired.pop(msg.request_id, None)
            return
        if (self.max_unsent_chunks is not None and not msg.finished
                and handle.chunks.qsize() >= self.max_unsent_chunks):
            self._cut_off(handle)
            return
        handle.num_tokens_received += len(msg.token_ids)
        handle.output_token_ids.extend(msg.token_ids)
        if handle.num_migrations:  # cached tokens of a replayed prompt are not the client's
            msg = msgspec.structs.replace(msg, num_cached_tokens=0)
        if msg.finished:
            self._forget(handle)  # the worker is done with it, whenever the reader gets here
        elif msg.token_ids:
            self.index.update_request(handle.wire_id, self._active_tokens(handle))
        handle.chunks.put_nowait((time.perf_counter(), msg))

    def _cut_off(self, handle: RequestHandle) -> None:
        """Its reader lets chunks pile up: cancel it on its worker and end its stream."""
        logger.warning("router: request %s cut off: %d token chunks wait for its reader",
                       handle.request_id, handle.chunks.qsize())
        self.cancel(handle)
        if self.on_slow_reader is not None:
            self.on_slow_reader()
        handle.chunks.put_nowait((time.perf_counter(), TokenChunk(
            handle.wire_id, [], True, FinishReason.ABORT,
            f"the client read too slowly: {self.max_unsent_chunks} token chunks waited")))

    def _on_close(self, connection: Connection) -> None:
        worker_id = next((w for w, link in self.links.items()
                          if link.connection is connection), None)
        if worker_id is None:
            return
        link = self.links.pop(worker_id)
        if not link.synced.done():
            link.synced.set_exception(ConnectionError(f"decode worker {worker_id} went away"))
            link.synced.exception()  # retrieved: nobody may be waiting for it any more
        if not self._is_closing:
            logger.warning("router: lost decode worker %s", worker_id)
        self.retired = {r: w for r, w in self.retired.items() if w != worker_id}
        for handle in [h for h in self.requests.values() if h.worker_id == worker_id]:
            self.index.finish_request(handle.wire_id)
            try:
                if handle.num_tokens_received == 0 and self._resubmit(handle, worker_id):
                    continue
                if handle.num_tokens_received and self._migrate(handle, worker_id):
                    continue
            except Exception:  # another link failing at the same moment: fail this one
                logger.exception("router: could not move request %s", handle.request_id)
            self._forget(handle)
            handle.chunks.put_nowait((time.perf_counter(), TokenChunk(
                handle.wire_id, [], True, FinishReason.WORKER_LOST,
                f"decode worker {worker_id} went away")))
        self.index.remove_worker(worker_id)

    def _resubmit(self, handle: RequestHandle, dead_worker: str) -> bool:
        try:
            self._send(handle, exclude=dead_worker)
        except NoWorker:
            return False
        self.num_resubmitted += 1
        logger.info("router: request %s moved from %s to %s before its first token",
                    handle.request_id, dead_worker, handle.worker_id)
        return True

    def _migrate(self, handle: RequestHandle, dead_worker: str) -> bool:
        """Replay a request with tokens on another worker (see the module docstring)."""
        original, emitted = handle.original, handle.output_token_ids
        if handle.num_migrations >= self.max_migrations:
            logger.warning("router: request %s lost its worker %s after %d migrations: not "
                           "moved again", handle.request_id, dead_worker, handle.num_migrations)
            return False
        sampling = original.sampling
        remaining = None if sampling.max_tokens is None else sampling.max_tokens - len(emitted)
        if remaining is not None and remaining < 1:
            return False  # it had all its tokens; only its last chunk was missing
        prompt = original.prompt_token_ids + emitted
        replay = msgspec.structs.replace(sampling, max_tokens=remaining,
                                         output_offset=sampling.output_offset + len(emitted))
        before = (handle.wire_id, handle.generate, handle.block_hashes, handle.first,
                  handle.num_replayed_tokens)
        handle.first = original
        handle.wire_id = f"{handle.request_id}#{next(self._suffixes)}"
        handle.generate = protocol.Generate(handle.wire_id, prompt, replay, original.priority)
        handle.block_hashes = hash_blocks(prompt, self.index.block_size)
        handle.num_replayed_tokens = len(emitted)
        try:
            self._send(handle, exclude=dead_worker)
        except NoWorker:
            (handle.wire_id, handle.generate, handle.block_hashes, handle.first,
             handle.num_replayed_tokens) = before
            return False
        self.requests.pop(before[0], None)
        self.requests[handle.wire_id] = handle
        handle.num_migrations += 1
        self.num_migrations += 1
        self.num_migrated_tokens += len(emitted)
        logger.info("router: request %s migrated from %s to %s with %d tokens replayed",
                    handle.request_id, dead_worker, handle.worker_id, len(emitted))
        return True
