"""A real HTTP router over a running test cluster, on its own thread and event loop.

The listening socket is bound and listening before the router starts, so a client may
connect at once: its connection waits in the backlog until the server accepts it.
"""

from __future__ import annotations

import dataclasses
import socket
import threading

import uvloop

from router.server import DrainingServer, run_router


class RouterServer:
    def __init__(self, cluster, api_key: str | None = None, **router_options):
        config = dataclasses.replace(cluster.config.router, **router_options)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.server: DrainingServer | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cluster, config, api_key),
                                        name="test-router", daemon=True)
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

    def __enter__(self) -> RouterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
