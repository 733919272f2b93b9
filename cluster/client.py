"""A request-plane client: submit requests to decode workers, read their token streams.

The cluster handle (and tests) use it; the HTTP router speaks the same messages. Token
chunks arrive on a uvloop thread and are handed to each request's queue, so callers simply
iterate a ``Stream`` from any thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
import uuid
from dataclasses import dataclass, field

from pdserve import protocol
from pdserve.protocol import Fingerprint, TokenChunk
from pdserve.transport import Connection, EventLoopThread, open_connection


@dataclass(slots=True)
class Completion:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""
    num_cached_tokens: int = 0
    worker_id: str = ""


class Stream:
    """One request's token chunks, in order; iteration ends after the last."""

    def __init__(self, request_id: str, worker_id: str):
        self.request_id = request_id
        self.worker_id = worker_id
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self):
        while True:
            chunk = self._chunks.get()
            yield chunk
            if chunk.finished:
                return

    def next_chunk(self, timeout_s: float | None = None) -> TokenChunk:
        return self._chunks.get(timeout=timeout_s)

    def result(self, timeout_s: float | None = None) -> Completion:
        completion = Completion(self.request_id, worker_id=self.worker_id)
        while True:
            chunk = self._chunks.get(timeout=timeout_s)
            completion.token_ids += chunk.token_ids
            if chunk.finished:
                completion.finish_reason = chunk.finish_reason
                completion.error = chunk.error
                completion.num_cached_tokens = chunk.num_cached_tokens
                return completion


class RequestPlaneClient:
    def __init__(self, fingerprint: Fingerprint, secret: str):
        self.fingerprint, self.secret = fingerprint, secret
        self.net = EventLoopThread("pdserve-client")
        self._lock = threading.Lock()
        self._decodes: dict[str, Connection] = {}
        self._streams: dict[str, Stream] = {}
        self._round_robin = itertools.count()

    def add_decode(self, worker_id: str, address: tuple[str, int]) -> None:
        connection = self.net.run(open_connection(
            address[0], address[1], "client", self.fingerprint, self.secret,
            self._on_message, self._on_close), timeout_s=30)
        with self._lock:
            self._decodes[worker_id] = connection

    def remove_decode(self, worker_id: str) -> None:
        with self._lock:
            connection = self._decodes.pop(worker_id, None)
        if connection is not None:
            connection.close()

    def submit(self, prompt_token_ids: list[int], sampling: dict,
               request_id: str | None = None, worker_id: str | None = None) -> Stream:
        """Send to ``worker_id``, or to the decode workers in turn."""
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            if not self._decodes:
                raise RuntimeError("no decode worker is connected")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            if worker_id is None:
                workers = sorted(self._decodes)
                worker_id = workers[next(self._round_robin) % len(workers)]
            elif worker_id not in self._decodes:
                raise ValueError(f"worker_id {worker_id!r} is not connected; connected: "
                                 f"{sorted(self._decodes)}")
            stream = Stream(request_id, worker_id)
            self._streams[request_id] = stream
            connection = self._decodes[worker_id]
        connection.send(protocol.Generate(request_id, list(prompt_token_ids), dict(sampling)))
        return stream

    def generate(self, prompt_token_ids: list[int], sampling: dict,
                 request_id: str | None = None, timeout_s: float | None = None) -> Completion:
        return self.submit(prompt_token_ids, sampling, request_id).result(timeout_s)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            connection = self._decodes.get(stream.worker_id) if stream else None
        if connection is not None:
            connection.send(protocol.Cancel(request_id))

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        with self._lock:
            connections = list(self._decodes.values())
            self._decodes.clear()
        for connection in connections:
            connection.close()
        self.net.stop()

    def _on_message(self, connection: Connection, msg) -> None:
        if not isinstance(msg, TokenChunk):
            return
        with self._lock:
            stream = self._streams.get(msg.request_id)
            if stream is not None and msg.finished:
                del self._streams[msg.request_id]
        if stream is not None:
            stream._chunks.put(msg)

    def _on_close(self, connection: Connection) -> None:
        with self._lock:
            lost = [s for s in self._streams.values() if s.worker_id == connection.peer]
            for stream in lost:
                del self._streams[stream.request_id]
        for stream in lost:
            stream._chunks.put(TokenChunk(stream.request_id, [], True, "",
                                          f"decode worker {connection.peer} went away"))
