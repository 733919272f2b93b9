"""KV events and load, published by a decode worker to its request-plane subscribers.

The router keeps an index of which worker holds which block hashes. Events carry sequence
numbers; a subscriber that sees a gap (or reconnects) asks for a snapshot by subscribing
again. Load goes out whenever it changed since the last report.
"""

from __future__ import annotations

from engine.engine import LLMEngine
from pdserve import protocol
from pdserve.transport import Connection


class EventPublisher:
    """Sends a decode worker's KV events and load to the router's subscriptions."""

    def __init__(self, worker_id: str, engine: LLMEngine):
        self.worker_id = worker_id
        self.engine = engine
        self.subscribers: dict[int, Connection] = {}
        self.seq = 0
        self._last_load: protocol.Load | None = None

    def subscribe(self, connection: Connection) -> None:
        """A snapshot as of ``seq``, then every later event and load change."""
        self.subscribers[connection.connection_id] = connection
        connection.send(protocol.KVSnapshot(self.worker_id, self.seq,
                                            self.engine.block_manager.cached_hashes()))
        connection.send(self.load())

    def unsubscribe(self, connection: Connection) -> None:
        self.subscribers.pop(connection.connection_id, None)

    def publish(self) -> None:
        """Called after each step: drains the block manager's events."""
        events = self.engine.drain_kv_events()
        if events:
            batch = protocol.KVEvents(self.worker_id, self.seq, events)
            self.seq += len(events)
            self._send(batch)
        load = self.load()
        if self.subscribers and load != self._last_load:
            self._last_load = load
            self._send(load)

    def load(self) -> protocol.Load:
        scheduler, block_manager = self.engine.scheduler, self.engine.block_manager
        return protocol.Load(self.worker_id, len(scheduler.running),
                             len(scheduler.waiting) + len(scheduler.waiting_for_remote_kv),
                             block_manager.num_free_blocks, block_manager.num_blocks)

    def _send(self, msg: protocol.Message) -> None:
        for connection in self.subscribers.values():
            connection.send(msg)
