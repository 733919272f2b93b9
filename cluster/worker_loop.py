"""The shape both worker kinds share: a request-plane server feeding one loop thread.

A worker's role (``decode.worker.DecodeWorker``, ``prefill.worker.PrefillWorker``) holds its
state and is touched only by the loop thread: the network thread queues messages and closed
connections, actor methods queue typed control commands (``control`` returns a future), and
the loop thread hands them to the role between iterations of its own work. A loop that
breaks exits the process (crash-only), so the supervisor restarts the group and peers fall
back, rather than requests hanging on a half-dead worker.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Protocol

from pdserve.protocol import Fingerprint, Message, PeerRole
from pdserve.transport import Connection, Dialer, EventLoopThread, serve

logger = logging.getLogger(__name__)


class WorkerRole(Protocol):
    """What the loop drives. Every method runs on the loop thread."""

    def iterate(self) -> None:
        """One round of work (a model step, a KV poll)."""

    def wait_s(self) -> float:
        """How long the inbox may block when there is nothing else to do (0: do not)."""

    def on_message(self, connection: Connection, msg: Message) -> None: ...

    def on_close(self, connection: Connection) -> None: ...

    def control(self, command: Any) -> Any:
        """Run a typed control command from the cluster; its result goes back to the caller."""

    def close(self) -> None:
        """Stop the rank group and release what the role holds."""


class _Stop:
    """The loop's own command: leave the loop."""


class WorkerLoop:
    """Listens on the request plane at ``address``; ``start`` runs a role on a new thread."""

    def __init__(self, name: str, fingerprint: Fingerprint, secret: str, host: str,
                 dial_as: PeerRole):
        self.name = name
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.net = EventLoopThread(f"{name}-net")
        self._server = self.net.run(serve(host, 0, fingerprint, secret, name,
                                          self._on_message, self._on_close))
        self.address = (host, self._server.sockets[0].getsockname()[1])
        self.dialer = Dialer(self.net, dial_as, fingerprint, secret, self._on_message,
                             self._on_close)
        self._is_stopping = False
        self._role: WorkerRole | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, role: WorkerRole) -> None:
        self._role = role
        self._thread.start()

    def control(self, command: Any) -> Future:
        """Run ``command`` on the loop thread; the future holds the role's answer."""
        done: Future = Future()
        self.inbox.put(("control", command, done))
        return done

    def shutdown(self) -> None:
        self.control(_Stop()).result(timeout=30)
        self._thread.join(timeout=30)
        self.net.loop.call_soon_threadsafe(self._server.close)
        if self._role is not None:
            self._role.close()
        self.net.stop()

    def _on_message(self, connection: Connection, msg: Message) -> None:
        self.inbox.put(("message", connection, msg))

    def _on_close(self, connection: Connection) -> None:
        self.inbox.put(("closed", connection))

    def _run(self) -> None:
        try:
            while not self._is_stopping:
                self._drain_inbox()
                if not self._is_stopping:
                    self._role.iterate()
        except Exception:
            logger.exception("%s: worker loop failed; exiting", self.name)
            os._exit(1)

    def _drain_inbox(self) -> None:
        wait_s = self._role.wait_s()
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
        kind = item[0]
        if kind == "control":
            _, command, done = item
            if isinstance(command, _Stop):
                self._is_stopping = True
                done.set_result(None)
                return
            try:
                done.set_result(self._role.control(command))
            except Exception as error:  # the caller (an actor method) re-raises it
                done.set_exception(error)
        elif kind == "message":
            self._role.on_message(item[1], item[2])
        else:
            self._role.on_close(item[1])
