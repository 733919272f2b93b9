"""Request-plane connections over local TCP: the challenge-and-response handshake
(pdserve.handshake) and the connections after it (pdserve.transport)."""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from pdserve import handshake, protocol, transport
from pdserve.protocol import Fingerprint, PeerRole, ProtocolError
from tests.unit.test_protocol import FINGERPRINT, MALFORMED, SAMPLES, frame_of

SECRET = secrets.token_hex(16)  # as the launcher makes one
WAIT_S = 10  # how long a queue.get waits for the loop thread before the test fails
V4 = protocol.PROTOCOL_VERSION


def good_hello(challenge: protocol.Challenge, role: PeerRole = PeerRole.CLIENT,
               secret: str = SECRET) -> protocol.Hello:
    proof = handshake.hello_proof(secret, challenge.nonce, V4, role, FINGERPRINT)
    return protocol.Hello(V4, role, FINGERPRINT, proof)


class Server:
    """A transport server on its own loop thread, recording what its callbacks see."""

    def __init__(self) -> None:
        self.loop = transport.EventLoopThread("test-server")
        self.messages: queue.SimpleQueue = queue.SimpleQueue()  # (peer role, message)
        self.closed: queue.SimpleQueue = queue.SimpleQueue()  # peer role
        self.connections: queue.SimpleQueue = queue.SimpleQueue()

        def on_message(connection: transport.Connection, msg: Any) -> None:
            self.connections.put(connection)
            self.messages.put((connection.peer, msg))

        self.server = self.loop.run(transport.serve(
            "127.0.0.1", 0, FINGERPRINT, SECRET, "server-0", on_message,
            lambda connection: self.closed.put(connection.peer)), WAIT_S)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.server.close)
        self.loop.stop()


class Client:
    """The dialling side, on another loop thread (as a different worker would be)."""

    def __init__(self, port: int) -> None:
        self.loop = transport.EventLoopThread("test-client")
        self.port = port
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.closed: queue.SimpleQueue = queue.SimpleQueue()

    def connect(self, role: PeerRole = PeerRole.DECODE, fingerprint: Fingerprint = FINGERPRINT,
                secret: str = SECRET, port: int | None = None) -> transport.Connection:
        return self.loop.run(transport.open_connection(
            "127.0.0.1", port or self.port, role, fingerprint, secret,
            lambda connection, msg: self.messages.put(msg),
            lambda connection: self.closed.put(connection.peer)), WAIT_S)

    def raw(self, data: bytes | Callable[[protocol.Challenge], bytes],
            is_handshaken: bool = False) -> tuple[Any, bytes]:
        """Read the server's Challenge on a bare socket and send ``data`` (or what it makes of
        the challenge), after a good handshake as a ``client`` peer when ``is_handshaken``;
        return the server's next message (the IncompleteReadError when it just closes) and
        the bytes that follow until EOF (none when that message accepted the peer)."""
        async def exchange() -> tuple[Any, bytes]:
            if is_handshaken:
                reader, writer, reply = await handshake.connect(
                    "127.0.0.1", self.port, PeerRole.CLIENT, FINGERPRINT, SECRET)
                assert reply == protocol.HelloReply(True, "", "server-0")
                challenge = None
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                challenge = await protocol.read_message(reader)
                assert isinstance(challenge, protocol.Challenge)
            writer.write(data if isinstance(data, bytes) else data(challenge))
            await writer.drain()
            try:
                reply = await protocol.read_message(reader)
            except asyncio.IncompleteReadError as error:
                reply = error
            is_accepted = isinstance(reply, protocol.HelloReply) and reply.ok
            rest = b"" if is_accepted else await reader.read()  # accepted: it stays open
            writer.close()
            return reply, rest

        return self.loop.run(exchange(), WAIT_S)


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server()
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    client = Client(server.port)
    yield client
    client.loop.stop()


def assert_only_good_messages_arrive(server: Server, client: Client) -> None:
    """A matching peer's message is the first and only one the server's on_message sees."""
    client.connect(role=PeerRole.ROUTER).send(protocol.Cancel("from-good-peer"))
    assert server.messages.get(timeout=WAIT_S) == ("router", protocol.Cancel("from-good-peer"))
    assert server.messages.empty()


def transport_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "pdserve.transport" and record.levelno == logging.WARNING]


def frames(data: bytes) -> list[protocol.Message]:
    """Every whole frame in ``data``, decoded."""
    messages = []
    while data:
        (size,) = struct.unpack(">I", data[:4])
        messages.append(protocol.decode(data[4:4 + size]))
        data = data[4 + size:]
    return messages


# -- the handshake ------------------------------------------------------------------------------

def test_a_matching_peer_exchanges_messages_both_ways(server: Server, client: Client):
    connection = client.connect(role=PeerRole.DECODE)
    assert connection.peer == "server-0"  # the server's worker id, from HelloReply
    connection.send(SAMPLES[protocol.Generate])
    assert server.messages.get(timeout=WAIT_S) == ("decode", SAMPLES[protocol.Generate])
    server.connections.get(timeout=WAIT_S).send(SAMPLES[protocol.TokenChunk])
    assert client.messages.get(timeout=WAIT_S) == SAMPLES[protocol.TokenChunk]
    connection.close()
    assert server.closed.get(timeout=WAIT_S) == "decode"
    assert client.closed.get(timeout=WAIT_S) == "server-0"


@pytest.mark.parametrize("fingerprint,secret,reason", [
    (FINGERPRINT, "not-the-secret", "wrong cluster secret"),
    (FINGERPRINT, SECRET[:-1], "wrong cluster secret"),
    (msgspec.structs.replace(FINGERPRINT, block_size=16), SECRET,
     "fingerprint mismatch (this worker vs peer): block_size=4 vs 16"),
    (msgspec.structs.replace(FINGERPRINT, model="other", tokenizer_hash="ffffffffffffffff"),
     SECRET, "fingerprint mismatch (this worker vs peer): model='tiny' vs 'other', "
     "tokenizer_hash='0123456789abcdef' vs 'ffffffffffffffff'"),
], ids=["secret", "secret-prefix", "block_size", "model-and-tokenizer"])
def test_a_mismatched_peer_is_refused_with_the_reason(
        server: Server, client: Client, fingerprint: Fingerprint, secret: str, reason: str):
    with pytest.raises(ProtocolError) as refused:
        client.connect(role=PeerRole.PREFILL, fingerprint=fingerprint, secret=secret)
    assert str(refused.value) == f"127.0.0.1:{server.port} refused the connection: {reason}"
    assert_only_good_messages_arrive(server, client)
    assert server.closed.empty()  # a refused peer never became a connection


def test_each_connection_is_challenged_with_a_fresh_nonce(server: Server, client: Client):
    nonces = []
    for _ in range(3):
        reply, _ = client.raw(lambda challenge: (nonces.append(challenge.nonce) or
                                                 protocol.encode(good_hello(challenge))))
        assert reply == protocol.HelloReply(True, "", "server-0")
    assert [len(nonce) for nonce in nonces] == [handshake.NONCE_BYTES] * 3
    assert len(set(nonces)) == 3


def test_the_secret_never_goes_on_the_wire(server: Server, client: Client):
    """Through a recording proxy: every byte the dialler sends, a refused try included."""
    sent = bytearray()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    record: bytearray | None) -> None:
        while data := await reader.read(65536):
            if record is not None:
                record.extend(data)
            writer.write(data)
        writer.close()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                         server.port)
        await asyncio.gather(relay(reader, upstream_writer, sent),
                             relay(upstream_reader, writer, None))

    proxy = client.loop.run(asyncio.start_server(pipe, "127.0.0.1", 0), WAIT_S)
    port = proxy.sockets[0].getsockname()[1]
    with pytest.raises(ProtocolError, match="wrong cluster secret"):
        client.connect(secret=SECRET + "-other", port=port)
    connection = client.connect(role=PeerRole.ROUTER, port=port)
    connection.send(SAMPLES[protocol.Generate])
    assert server.messages.get(timeout=WAIT_S) == ("router", SAMPLES[protocol.Generate])
    connection.close()
    assert server.closed.get(timeout=WAIT_S) == "router"
    client.loop.loop.call_soon_threadsafe(proxy.close)
    sent = bytes(sent)
    assert SECRET.encode() not in sent
    assert [type(msg) for msg in frames(sent)] == [protocol.Hello, protocol.Hello,
                                                   protocol.Generate]
    assert all(len(msg.proof) == 32 for msg in frames(sent)[:2])  # an HMAC-SHA256 digest


def test_a_replayed_hello_is_refused(server: Server, client: Client):
    captured = {}

    def capture(challenge: protocol.Challenge) -> bytes:
        captured["frame"] = protocol.encode(good_hello(challenge))
        return captured["frame"]

    assert client.raw(capture)[0] == protocol.HelloReply(True, "", "server-0")
    reply, rest = client.raw(captured["frame"])  # the same Hello against a new nonce
    assert (reply, rest) == (protocol.HelloReply(False, "wrong cluster secret", "server-0"),
                             b"")
    assert_only_good_messages_arrive(server, client)


def test_a_proof_holds_only_for_the_role_it_was_made_for(server: Server, client: Client):
    def as_router(challenge: protocol.Challenge) -> bytes:
        hello = good_hello(challenge, role=PeerRole.PREFILL)
        return protocol.encode(msgspec.structs.replace(hello, role=PeerRole.ROUTER))

    reply, rest = client.raw(as_router)
    assert (reply, rest) == (protocol.HelloReply(False, "wrong cluster secret", "server-0"),
                             b"")


@pytest.mark.parametrize("first,reason", [
    (lambda challenge: protocol.encode(msgspec.structs.replace(good_hello(challenge),
                                                               version=999)),
     "protocol version 999, this worker speaks 4"),
    # version 3's Hello carried the secret in clear: its layout does not decode as ours
    (lambda challenge: frame_of([1, 3, "prefill", list(msgspec.structs.astuple(FINGERPRINT)),
                                 SECRET]),
     "protocol version 3, this worker speaks 4"),
    (lambda challenge: protocol.encode(protocol.Cancel("sneaky")),
     "expected Hello first, got Cancel"),
], ids=["version", "version-3-layout", "not-hello"])
def test_a_raw_peer_is_refused_and_disconnected(
        server: Server, client: Client, first: Callable, reason: str):
    reply, rest = client.raw(first)
    assert reply == protocol.HelloReply(False, reason, "server-0")
    assert rest == b""  # the server closed the connection after the refusal
    assert_only_good_messages_arrive(server, client)


@pytest.mark.parametrize("case", ["fingerprint-short", "fingerprint-layers-str", "role",
                                  "proof-str"])
def test_a_malformed_hello_is_dropped_without_a_reply(
        server: Server, client: Client, caplog: pytest.LogCaptureFixture, case: str):
    caplog.set_level(logging.WARNING, logger="pdserve.transport")
    values, reason = MALFORMED[case]
    reply, rest = client.raw(frame_of(values))
    assert isinstance(reply, asyncio.IncompleteReadError)  # closed with no HelloReply
    assert (reply.partial, rest) == (b"", b"")
    assert transport_warnings(caplog) == [
        f"refused a request-plane peer: undecodable message: {reason}"]
    assert_only_good_messages_arrive(server, client)
    assert server.closed.empty()  # a refused peer never became a connection


def test_a_silent_peer_is_dropped_after_the_handshake_timeout(
        server: Server, client: Client, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.WARNING, logger="pdserve.transport")
    monkeypatch.setattr(handshake, "HANDSHAKE_TIMEOUT_S", 0.2)
    reply, rest = client.raw(b"")  # reads the Challenge, then says nothing
    assert isinstance(reply, asyncio.IncompleteReadError)
    assert transport_warnings(caplog) == ["refused a request-plane peer: no Hello within 0.2 s"]
    assert server.closed.empty()


def fake_listener(client: Client, first: bytes) -> int:
    """A port whose listener sends ``first`` (or nothing) and then reads forever."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        await reader.read()
        writer.close()

    listener = client.loop.run(asyncio.start_server(handle, "127.0.0.1", 0), WAIT_S)
    return listener.sockets[0].getsockname()[1]


@pytest.mark.parametrize("first,reason", [
    (protocol.encode(protocol.Challenge(5, b"n" * 32)),
     "protocol version 5, this process speaks 4"),
    (protocol.encode(protocol.Cancel("x")), "expected Challenge first, got Cancel"),
    (b"", "no Challenge within 0.2 s"),
], ids=["version", "not-challenge", "silent"])
def test_the_dialler_refuses_a_listener_that_does_not_challenge_it(
        client: Client, monkeypatch: pytest.MonkeyPatch, first: bytes, reason: str):
    monkeypatch.setattr(handshake, "HANDSHAKE_TIMEOUT_S", 0.2)
    port = fake_listener(client, first)
    with pytest.raises(ProtocolError) as refused:
        client.connect(port=port)
    assert str(refused.value) == f"handshake with 127.0.0.1:{port} failed: {reason}"


# -- after the handshake ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["token-id-str", "max-tokens-0", "finish-reason",
                                  "kv-event-kind"])
def test_a_malformed_message_closes_the_connection_and_reaches_no_one(
        server: Server, client: Client, caplog: pytest.LogCaptureFixture, case: str):
    caplog.set_level(logging.WARNING, logger="pdserve.transport")
    values, reason = MALFORMED[case]
    before, after = protocol.Cancel("before"), protocol.Cancel("after")
    reply, rest = client.raw(protocol.encode(before) + frame_of(values)
                             + protocol.encode(after), is_handshaken=True)
    assert reply == protocol.Error(f"undecodable message: {reason}")
    assert rest == b""
    assert server.closed.get(timeout=WAIT_S) == "client"
    assert transport_warnings(caplog) == [
        f"closing the connection to client: undecodable message: {reason}"]
    # The message before it arrived; neither it nor anything after it did.
    assert server.messages.get(timeout=WAIT_S) == ("client", before)
    assert_only_good_messages_arrive(server, client)


def test_a_frame_over_the_limit_closes_the_connection_with_an_error(
        server: Server, client: Client, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="pdserve.transport")
    reply, rest = client.raw(struct.pack(">I", protocol.MAX_FRAME_BYTES + 1),
                             is_handshaken=True)
    reason = "frame of 16777217 bytes exceeds the 16777216-byte limit"
    assert (reply, rest) == (protocol.Error(reason), b"")
    assert server.closed.get(timeout=WAIT_S) == "client"
    assert server.messages.empty()
    assert transport_warnings(caplog) == [f"closing the connection to client: {reason}"]
