"""Request-plane connections: msgpack frames over asyncio streams, on a uvloop thread.

Workers run their model in their own thread; the event loop runs here, in another. Each
connection hands received messages to a callback on the loop thread (which must not block:
it queues them for the worker), and ``Connection.send`` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from pdserve import handshake, protocol
from pdserve.protocol import Fingerprint, Message, PeerRole, ProtocolError

logger = logging.getLogger(__name__)

OnMessage = Callable[["Connection", Message], None]
OnClose = Callable[["Connection"], None]

_connection_ids = itertools.count()


class EventLoopThread:
    """An event loop (uvloop when installed) running in a daemon thread."""

    def __init__(self, name: str):
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine, timeout_s: float | None = None) -> Any:
        """Run a coroutine on the loop from another thread and wait for its result."""
        return self.submit(coro).result(timeout_s)

    def stop(self) -> None:
        """Cancel what still runs (connection readers), then stop and close the loop."""
        if self.loop.is_running():
            try:
                self.run(_cancel_tasks(), timeout_s=10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_tasks() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Connection:
    """One handshaken peer. ``send`` is thread-safe; after close it drops messages."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter,
                 peer: str):
        self.connection_id = next(_connection_ids)
        self.peer = peer  # the peer's worker id or role
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread
        self._writer = writer
        self.is_closed = False

    def send(self, msg: Message) -> None:
        frame = protocol.encode(msg)
        if threading.get_ident() == self._loop_thread:
            self._write(frame)  # on the loop already (the router): write now, not next turn
            return
        try:
            self._loop.call_soon_threadsafe(self._write, frame)
        except RuntimeError:  # the loop is closed: so is the connection
            self.is_closed = True

    def _write(self, frame: bytes) -> None:
        if self.is_closed or self._writer.transport.is_closing():
            return
        try:
            self._writer.write(frame)
        except (RuntimeError, OSError):  # the peer reset it: its reader sees the close
            self._close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            self._writer.close()


async def _pump(connection: Connection, reader: asyncio.StreamReader, on_message: OnMessage,
                on_close: OnClose) -> None:
    try:
        while True:
            on_message(connection, await protocol.read_message(reader))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    except ProtocolError as error:
        logger.warning("closing the connection to %s: %s", connection.peer, error)
        connection._write(protocol.encode(protocol.Error(str(error))))
    finally:
        connection._close()
        on_close(connection)


async def serve(host: str, port: int, fingerprint: Fingerprint, secret: str, worker_id: str,
                on_message: OnMessage, on_close: OnClose) -> asyncio.base_events.Server:
    """Listen; each connection shakes hands (``pdserve.handshake``), then its messages go
    to ``on_message``."""
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await handshake.accept(reader, writer, fingerprint, secret, worker_id)
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as error:
            logger.warning("refused a request-plane peer: %s", error)
            writer.close()
            return
        connection = Connection(loop, writer, hello.role.value)
        await _pump(connection, reader, on_message, on_close)

    return await asyncio.start_server(handle, host, port)


async def open_connection(host: str, port: int, role: PeerRole, fingerprint: Fingerprint,
                          secret: str, on_message: OnMessage, on_close: OnClose) -> Connection:
    """Connect and shake hands; the reader runs as a task feeding ``on_message``."""
    reader, writer, reply = await handshake.connect(host, port, role, fingerprint, secret)
    connection = Connection(asyncio.get_running_loop(), writer, reply.worker_id)
    asyncio.get_running_loop().create_task(_pump(connection, reader, on_message, on_close))
    return connection


class Dialer:
    """Opens request-plane connections from a worker whose messages, like those of its
    server's connections, go to the worker loop's callbacks (on the network thread)."""

    def __init__(self, net: EventLoopThread, role: PeerRole, fingerprint: Fingerprint,
                 secret: str, on_message: OnMessage, on_close: OnClose):
        self.net, self.role = net, role
        self.fingerprint, self.secret = fingerprint, secret
        self.on_message, self.on_close = on_message, on_close

    def connect(self, host: str, port: int, timeout_s: float = 30.0) -> Connection:
        """Connect and shake hands (blocking, from a thread other than the network's)."""
        return self.net.run(open_connection(host, port, self.role, self.fingerprint,
                                            self.secret, self.on_message, self.on_close),
                            timeout_s=timeout_s)


def resident_bytes() -> int:
    """This process's resident memory (Linux), for the no-growth checks; 0 elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
