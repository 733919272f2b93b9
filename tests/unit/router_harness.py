"""The HTTP app over a real ``Router`` in one event loop, with no Ray and no model: a fake
decode worker on the loopback request plane answers by request id, and requests go straight
to the ASGI app, so a test decides exactly when the body ends and when the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pdserve import protocol, transport
from pdserve.cluster_handle import ModelInfo, WorkerAddress
from pdserve.config import RouterConfig
from pdserve.protocol import Fingerprint, FinishReason, TokenChunk
from router.app import build_app
from router.service import Router

FINGERPRINT = Fingerprint("tiny", 2, 2, 16, 16, "float32", "auto", "0123456789abcdef", "none")
SECRET = "router-harness-secret"
WORKER_ID = "decode0.0"
OUTPUT_IDS = [72, 503]  # what the fake worker generates: two tokens of the tiny vocabulary
FLOOD = 64  # chunks a flood* request gets before its worker holds it


@dataclass(slots=True)
class FakeDecode:
    """Answers ``Generate`` by its request id: ``fail*`` with an error chunk, ``hold*`` not
    until it is cancelled (then ``abort``), ``flood*`` with ``FLOOD`` one-token chunks and
    then not until cancelled, anything else with ``OUTPUT_IDS`` and ``length``."""

    generates: list[protocol.Generate] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    held: asyncio.Queue = field(default_factory=asyncio.Queue)  # request ids held
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the router's link closed

    def on_message(self, connection: transport.Connection, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Subscribe):
            connection.send(protocol.KVSnapshot(WORKER_ID, 0, []))
        elif isinstance(msg, protocol.Cancel):
            self.cancels.append(msg.request_id)
            connection.send(TokenChunk(msg.request_id, [], True, FinishReason.ABORT))
        elif isinstance(msg, protocol.Generate):
            self.generates.append(msg)
            request_id = msg.request_id
            if request_id.startswith("hold"):
                self.held.put_nowait(request_id)
            elif request_id.startswith("flood"):
                for _ in range(FLOOD):
                    connection.send(TokenChunk(request_id, [OUTPUT_IDS[0]]))
            elif request_id.startswith("fail"):
                connection.send(TokenChunk(request_id, [], True, None, "the worker broke"))
            else:
                connection.send(TokenChunk(request_id, OUTPUT_IDS, True, FinishReason.LENGTH))


@dataclass(slots=True)
class Answer:
    """One HTTP response as the client got it."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body.decode("utf-8"))  # strict: what the client must decode


@dataclass(slots=True)
class Edge:
    """The app under test, its router and the fake worker behind it."""

    app: object
    router: Router
    worker: FakeDecode

    async def call(self, method: str, path: str, body: bytes | dict | None = None,
                   headers: dict[str, str] | None = None,
                   parts: list[bytes] | None = None, leave: asyncio.Event | None = None,
                   stalled: bool = False) -> Answer:
        """Send a request: ``body`` (a dict goes as JSON, with that Content-Type unless
        ``headers`` name one), or ``parts`` of a chunked body that never ends; the client
        disconnects once ``leave`` is set (at once after ``parts``). A ``stalled`` client
        takes the response's start and then never reads: every body write waits forever."""
        headers = dict(headers or {})
        if isinstance(body, dict):
            headers.setdefault("content-type", "application/json")
            body = json.dumps(body).encode()
        incoming = [{"type": "http.request", "body": part, "more_body": True}
                    for part in parts] if parts is not None else [
                        {"type": "http.request", "body": body or b"", "more_body": False}]
        leave = leave or (asyncio.Event() if parts is None else _set(asyncio.Event()))
        done = asyncio.Event()
        sent: list[dict] = []

        async def receive() -> dict:
            if incoming:
                return incoming.pop(0)
            waiters = [asyncio.ensure_future(leave.wait()), asyncio.ensure_future(done.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if stalled and message["type"] == "http.response.body":
                await asyncio.Event().wait()  # a full socket that never drains
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await self.app(_scope(method, path, headers), receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        return Answer(start["status"],
                      {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]},
                      b"".join(m.get("body", b"") for m in sent
                               if m["type"] == "http.response.body"))

    async def requests_total(self) -> dict[str, float]:
        """``pdserve_requests_total`` by status, as a scraper reads it."""
        text = (await self.router.metrics.render()).decode()
        return {sample.labels["status"]: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "pdserve_requests_total"}


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


def _scope(method: str, path: str, headers: dict[str, str]) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


@asynccontextmanager
async def edge(model_dir: Path, api_key: str | None = None, max_running: int = 4,
               **config) -> AsyncIterator[Edge]:
    """A router linked to a fresh fake decode worker, and the app in front of it."""
    worker = FakeDecode()
    server = await transport.serve("127.0.0.1", 0, FINGERPRINT, SECRET, WORKER_ID,
                                   worker.on_message, lambda connection: worker.closed.set())
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    router = Router(ModelInfo(str(model_dir), vocab_size, 256, 16), RouterConfig(**config),
                    FINGERPRINT, SECRET, max_running=max_running)
    try:
        await router.links.add(WorkerAddress(WORKER_ID, "127.0.0.1",
                                             server.sockets[0].getsockname()[1]))
        yield Edge(build_app(router, api_key), router, worker)
    finally:
        router.close()
        server.close()
        await asyncio.wait_for(worker.closed.wait(), 10)  # its reader ends, not cancelled
