"""The shape both worker kinds share: a request-plane server feeding one loop thread.

Other threads never touch a worker's state: the network thread queues messages and closed
connections, actor methods queue control calls (``control`` returns a future), and the loop
thread handles them between iterations of its own work. A loop that breaks exits the
process (crash-only), so the supervisor restarts the group and peers fall back, rather than
requests hanging on a half-dead worker.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any

from pdserve.protocol import Fingerprint
from pdserve.transport import Connection, EventLoopThread, serve

logger = logging.getLogger(__name__)


class WorkerLoop:
    """Subclasses implement ``_iterate`` (one round of work), ``_wait_s`` (how long the inbox
    may block when there is nothing else to do), ``_on_request_plane``,
    ``_connection_closed`` and ``_control_<kind>`` methods, and set ``group`` (a RankGroup)."""

    group: Any

    def _start_loop(self, name: str, fingerprint: Fingerprint, secret: str, host: str) -> None:
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._is_stopping = False
        self.net = EventLoopThread(f"{name}-net")
        self._server = self.net.run(serve(host, 0, fingerprint, secret, name,
                                          self._on_message, self._on_close))
        self.address = (host, self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def control(self, kind: str, *args: Any) -> Future:
        """Run ``_control_<kind>(*args)`` on the loop thread; the future holds its result."""
        done: Future = Future()
        self.inbox.put(("control", kind, args, done))
        return done

    def _on_message(self, connection: Connection, msg: Any) -> None:
        self.inbox.put(("message", connection, msg))

    def _on_close(self, connection: Connection) -> None:
        self.inbox.put(("closed", connection))

    def _run(self) -> None:
        try:
            while not self._is_stopping:
                self._drain_inbox()
                self._iterate()
        except Exception:
            logger.exception("%s: worker loop failed; exiting", self._thread.name)
            os._exit(1)

    def _drain_inbox(self) -> None:
        wait_s = self._wait_s()
        try:
            item = self.inbox.get(timeout=wait_s) if wait_s else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple) -> None:
        if item[0] == "control":
            _, kind, args, done = item
            try:
                done.set_result(getattr(self, f"_control_{kind}")(*args))
            except Exception as error:  # the caller (an actor method) re-raises it
                done.set_exception(error)
        elif item[0] == "message":
            self._on_request_plane(item[1], item[2])
        else:
            self._connection_closed(item[1])

    def _control_stop(self) -> None:
        self._is_stopping = True

    def shutdown(self) -> None:
        self.control("stop").result(timeout=30)
        self._thread.join(timeout=30)
        self.net.loop.call_soon_threadsafe(self._server.close)
        self.group.stop()
        self.group.worker.close()
        self.net.stop()

    def _iterate(self) -> None:
        raise NotImplementedError

    def _wait_s(self) -> float:
        raise NotImplementedError

    def _on_request_plane(self, connection: Connection, msg: Any) -> None:
        raise NotImplementedError

    def _connection_closed(self, connection: Connection) -> None:
        raise NotImplementedError
