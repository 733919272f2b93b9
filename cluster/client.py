"""The cluster's synchronous facade over the one request-plane client (``router.workers``).

``Cluster.generate`` and ``Cluster.submit`` land here. The client runs ``DecodeLinks`` (with
its KV index, so requests go where their prefix is cached) on a uvloop thread of its own, and
connects to the decode workers on first use: a cluster nobody submits to directly opens no
connection. Failover is the router's: a request with no token yet moves off a dead worker; one
that has tokens ends with an error chunk.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pdserve.cluster_handle import ClusterHandle, WorkerAddress
from pdserve.hashing import hash_blocks
from pdserve.protocol import FinishReason, PeerRole, TokenChunk
from pdserve.sampling import SamplingParams
from pdserve.transport import EventLoopThread
from router.kv_index import KVIndex
from router.workers import DecodeLinks, RequestHandle

_MAX_INDEX_BLOCKS_PER_WORKER = 1 << 20
_CONNECT_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Completion:
    """A finished request: every token id, why it ended, and where it ran."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str = ""
    num_cached_tokens: int = 0
    worker_id: str = ""


class Stream:
    """One request's token chunks, in order; iteration ends after the last."""

    def __init__(self, handle: RequestHandle, chunks: queue.SimpleQueue):
        self.handle = handle
        self._chunks = chunks

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    @property
    def worker_id(self) -> str:
        return self.handle.worker_id

    def __iter__(self) -> Iterator[TokenChunk]:
        while True:
            chunk = self.next_chunk()
            yield chunk
            if chunk.finished:
                return

    def next_chunk(self, timeout_s: float | None = None) -> TokenChunk:
        _, chunk = self._chunks.get(timeout=timeout_s)
        return chunk

    def result(self, timeout_s: float | None = None) -> Completion:
        completion = Completion(self.request_id)
        while True:
            chunk = self.next_chunk(timeout_s)
            completion.token_ids += chunk.token_ids
            if chunk.finished:
                completion.finish_reason = chunk.finish_reason
                completion.error = chunk.error
                completion.num_cached_tokens = chunk.num_cached_tokens
                completion.worker_id = self.worker_id
                return completion


class ClusterClient:
    """Submit requests from any thread; token chunks come back on each request's ``Stream``."""

    def __init__(self, cluster: ClusterHandle):
        self.cluster = cluster
        self._lock = threading.Lock()
        self._net: EventLoopThread | None = None
        self._links: DecodeLinks | None = None

    @property
    def num_open_streams(self) -> int:
        return len(self._links.requests) if self._links is not None else 0

    def submit(self, prompt_token_ids: list[int],
               sampling: SamplingParams | Mapping[str, Any] | None = None,
               request_id: str | None = None, worker_id: str | None = None) -> Stream:
        """Start a request (``sampling`` as ``SamplingParams`` or its fields by name) on the
        worker the KV index picks, or on ``worker_id``."""
        if not isinstance(sampling, SamplingParams):
            sampling = SamplingParams(**(sampling or {}))  # ValueError names the field
        links = self._connected()
        block_hashes = hash_blocks(prompt_token_ids, self.cluster.model.block_size)
        chunks: queue.SimpleQueue = queue.SimpleQueue()

        async def start() -> RequestHandle:
            return links.submit(request_id or uuid.uuid4().hex, list(prompt_token_ids),
                                sampling, 0, block_hashes, chunks, worker_id)

        handle = self._net.run(start(), timeout_s=_CONNECT_TIMEOUT_S)
        return Stream(handle, chunks)

    def cancel(self, stream: Stream) -> None:
        """Stop the request; its stream still ends with the worker's last chunk."""
        self._net.loop.call_soon_threadsafe(self._links.stop, stream.handle)

    def close(self) -> None:
        with self._lock:
            if self._net is None:
                return
            self.cluster.unwatch_decodes(self._added, self._removed)
            self._net.run(self._close_links(), timeout_s=10)
            self._net.stop()
            self._net = None

    async def _close_links(self) -> None:
        self._links.close()

    def _connected(self) -> DecodeLinks:
        with self._lock:
            if self._links is None:
                self._net = EventLoopThread("pdserve-cluster-client")
                self._links = self._net.run(self._make_links(), timeout_s=10)
                self.cluster.watch_decodes(self._added, self._removed)
                for worker in self.cluster.decode_addresses():
                    self._net.run(self._links.add_with_retry(worker),
                                  timeout_s=_CONNECT_TIMEOUT_S * 2)
            return self._links

    async def _make_links(self) -> DecodeLinks:
        index = KVIndex(self.cluster.model.block_size, 1.0, _MAX_INDEX_BLOCKS_PER_WORKER)
        return DecodeLinks(self.cluster.fingerprint, self.cluster.secret, index,
                           PeerRole.CLIENT)

    def _added(self, worker: WorkerAddress) -> None:  # on the supervisor's thread
        net, links = self._net, self._links
        net.loop.call_soon_threadsafe(net.loop.create_task, links.add_with_retry(worker))

    def _removed(self, worker_id: str) -> None:
        self._net.loop.call_soon_threadsafe(self._links.remove, worker_id)
