"""Run the HTTP router on uvicorn (uvloop, httptools) in front of a running cluster.

SIGTERM or Ctrl-C drains: /health turns 503 and new requests are refused with 503, the
requests in flight run to their end (up to ``router.drain_timeout_s``), then the server
stops. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn
import uvloop

from pdserve.cluster_handle import ClusterHandle, WorkerAddress
from pdserve.config import RouterConfig
from pdserve.protocol import ProtocolError
from router.app import build_app
from router.service import Router

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first exit signal drains instead of stopping."""

    def __init__(self, config: uvicorn.Config, router: Router, drain_timeout_s: float):
        super().__init__(config)
        self.router, self.drain_timeout_s = router, drain_timeout_s
        self._loop = asyncio.get_running_loop()  # made on the loop it serves from

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.router.is_draining:  # asked twice: stop now
            self.force_exit = self.should_exit = True
            return
        self.router.is_draining = True
        logger.warning("pdserve: draining (%d requests in flight; up to %.0f s); "
                       "signal again to stop at once", self.router.num_in_flight,
                       self.drain_timeout_s)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    def drain(self) -> None:
        """From any thread: what SIGTERM does."""
        self.handle_exit(signal.SIGTERM, None)

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.router.wait_idle(), self.drain_timeout_s)
        except asyncio.TimeoutError:
            logger.warning("pdserve: %d requests still running after %.0f s; stopping",
                           self.router.num_in_flight, self.drain_timeout_s)
        self.should_exit = True


async def run_router(cluster: ClusterHandle, config: RouterConfig, api_key: str | None,
                     on_started: Callable[[DrainingServer], None] | None = None,
                     sockets: list[socket.socket] | None = None) -> None:
    """Serve until drained; the cluster is the caller's to shut down."""
    router = Router(cluster.model, config, cluster.fingerprint, cluster.secret,
                    max_running=config.max_running or cluster.max_running,
                    worker_stats=cluster.worker_stats)
    loop = asyncio.get_running_loop()

    def added(worker: WorkerAddress) -> None:  # the supervisor's thread
        loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(router.links.add_with_retry(worker)))

    def removed(worker_id: str) -> None:
        loop.call_soon_threadsafe(router.links.remove, worker_id)

    cluster.watch_decodes(added, removed)  # first: a restart from now on is not missed
    for worker in cluster.decode_addresses():
        try:
            await router.links.add(worker)
        except (OSError, asyncio.TimeoutError, ProtocolError) as error:
            logger.warning("router: %s is not reachable (%s); serving without it until it "
                           "is replaced", worker.worker_id, error)
    server = DrainingServer(uvicorn.Config(
        build_app(router, api_key), host=config.host, port=config.port, http="httptools",
        lifespan="off", log_level="warning", access_log=False,
        timeout_graceful_shutdown=5), router, config.drain_timeout_s)
    if on_started is not None:
        on_started(server)
    try:
        await server.serve(sockets)
    finally:
        cluster.unwatch_decodes(added, removed)
        router.close()


def serve_forever(cluster: ClusterHandle, config: RouterConfig, api_key: str | None,
                  on_started: Callable[[DrainingServer], None] | None = None) -> None:
    """Block serving HTTP on a uvloop event loop in this thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve_forever must run in the main thread (it handles signals)")
    uvloop.run(run_router(cluster, config, api_key, on_started))


class RouterThread:
    """The router in a background thread of this process, over a running cluster, at
    ``url`` (benchmarks, tests, notebooks). The listening socket is bound and listening
    before the router starts, so a client may connect at once: its connection waits in the
    backlog until the server accepts it. Signals stay with the caller: ``close`` drains."""

    def __init__(self, cluster: ClusterHandle, api_key: str | None = None,
                 config: RouterConfig | None = None, **router_options):
        config = dataclasses.replace(config or RouterConfig(), **router_options)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.server: DrainingServer | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cluster, config, api_key),
                                        name="pdserve-router", daemon=True)
        self._thread.start()
        if not self._started.wait(120):
            raise RuntimeError("the router did not start within 120 s")
        if self.error is not None:
            raise RuntimeError("the router failed to start") from self.error

    @property
    def router(self):
        return self.server.router

    def _run(self, cluster, config, api_key) -> None:
        try:
            uvloop.run(run_router(cluster, config, api_key, self._on_started,
                                  sockets=[self._socket]))
        except BaseException as error:
            self.error = error
        finally:
            self._started.set()

    def _on_started(self, server: DrainingServer) -> None:
        self.server = server
        self._started.set()

    def close(self) -> None:
        if self.server is not None:
            self.server.drain()
        self._thread.join(60)
        self._socket.close()

    def __enter__(self) -> RouterThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
