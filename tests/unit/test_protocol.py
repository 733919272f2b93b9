"""The request plane's wire (pdserve.protocol) and its connections (pdserve.transport)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pdserve import protocol, transport
from pdserve.protocol import Fingerprint, ProtocolError

SECRET = "cluster-secret"
WAIT_S = 10  # how long a queue.get waits for the loop thread before the test fails

FINGERPRINT = Fingerprint("tiny", 2, 2, 16, 4, "float32", "fp8", "0123456789abcdef")

# One instance of every message, each field away from its default so that a field dropped or
# swapped on the wire shows. Hashes use the full unsigned 64-bit range.
SAMPLES = {
    protocol.Hello: protocol.Hello(1, "decode", {"model": "tiny", "num_layers": 2}, "s3cret"),
    protocol.HelloReply: protocol.HelloReply(False, "wrong cluster secret", "decode-0"),
    protocol.Generate: protocol.Generate(
        "req-1", [1, 2, 3], {"max_tokens": 8, "temperature": 0.5, "stop_token_ids": [7]}, 2),
    protocol.TokenChunk: protocol.TokenChunk("req-1", [4, 5], True, "length", "bad input", 16),
    protocol.Cancel: protocol.Cancel("req-1"),
    protocol.Subscribe: protocol.Subscribe(),
    protocol.KVEvents: protocol.KVEvents(
        "decode-0", 41, [["stored", 2**64 - 1], ["removed", 0]]),
    protocol.KVSnapshot: protocol.KVSnapshot("decode-0", 40, [2**64 - 1, 12345, 0]),
    protocol.Load: protocol.Load("decode-0", 3, 4, 100, 128),
    protocol.PrefillJob: protocol.PrefillJob(
        "req-1", 2, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, ["agent-0", "agent-1"], [7, 3], 2.5),
    protocol.JobReply: protocol.JobReply("req-1", 2, False, "queue full", 17),
    protocol.CancelJob: protocol.CancelJob("req-1", 2),
    protocol.CancelJobReply: protocol.CancelJobReply("req-1", 2, True, 5),
    protocol.QueueDepth: protocol.QueueDepth(9),
    protocol.Error: protocol.Error("frame too large"),
}


def payload_of(frame: bytes) -> bytes:
    return frame[4:]


def as_dict(fingerprint: Fingerprint) -> dict:
    return {name: getattr(fingerprint, name) for name in Fingerprint.__dataclass_fields__}


# -- encode / decode --------------------------------------------------------------------------

def test_every_message_type_has_a_sample():
    assert set(SAMPLES) == set(protocol._MESSAGES.values())


def test_tags_are_pinned_and_unique():
    # The tags are the wire format: changing one breaks every peer of another version.
    assert {tag: cls.__name__ for tag, cls in protocol._MESSAGES.items()} == {
        1: "Hello", 2: "HelloReply", 10: "Generate", 11: "TokenChunk", 12: "Cancel",
        13: "Subscribe", 14: "KVEvents", 15: "KVSnapshot", 16: "Load", 20: "PrefillJob",
        21: "JobReply", 22: "CancelJob", 23: "CancelJobReply", 24: "QueueDepth", 30: "Error",
    }
    assert all(cls.TAG == tag for tag, cls in protocol._MESSAGES.items())


def test_registering_a_used_tag_raises():
    @dataclass(frozen=True)
    class Impostor:
        pass

    with pytest.raises(RuntimeError, match="^message tag 12 used twice$"):
        protocol.message(12)(Impostor)
    assert protocol._MESSAGES[12] is protocol.Cancel


@pytest.mark.parametrize("msg", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_round_trip(msg: Any):
    frame = protocol.encode(msg)
    decoded = protocol.decode(payload_of(frame))
    assert decoded == msg
    assert type(decoded) is type(msg)


@pytest.mark.parametrize("msg", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_frame_is_length_header_then_tagged_array(msg: Any):
    frame = protocol.encode(msg)
    payload = payload_of(frame)
    assert frame[:4] == struct.pack(">I", len(payload))
    assert msgpack.unpackb(payload)[0] == msg.TAG


def test_defaults_are_filled_when_a_peer_sends_fewer_fields():
    payload = msgpack.packb([protocol.TokenChunk.TAG, "req-1", [4]])
    assert protocol.decode(payload) == protocol.TokenChunk("req-1", [4], False, "", "", 0)


@pytest.mark.parametrize("payload", [
    b"",
    b"\xc1",  # a byte msgpack never uses
    b"\x93\x0c",  # an array of 3 that ends after one element
    msgpack.packb([12, "req-1"]) + b"\x00",  # trailing bytes
    msgpack.packb(None),
    msgpack.packb(7),
    msgpack.packb([]),
    msgpack.packb([[12], "req-1"]),  # a list as the tag
], ids=["empty", "reserved-byte", "truncated", "trailing", "nil", "int", "empty-array",
        "list-tag"])
def test_garbage_raises_protocol_error(payload: bytes):
    with pytest.raises(ProtocolError, match="^undecodable message: "):
        protocol.decode(payload)


def test_unknown_tag_raises_protocol_error():
    with pytest.raises(ProtocolError, match=r"^undecodable message: KeyError\(99\)$"):
        protocol.decode(msgpack.packb([99, "x"]))


@pytest.mark.parametrize("values", [
    [protocol.Cancel.TAG],  # too few
    [protocol.Cancel.TAG, "req-1", "extra"],  # too many
    [protocol.Subscribe.TAG, "extra"],
    [protocol.Load.TAG, "decode-0", 1, 2, 3],  # one short
    [protocol.TokenChunk.TAG, "req-1", [1], True, "stop", "", 0, "extra"],
])
def test_wrong_field_count_raises_protocol_error(values: list):
    with pytest.raises(ProtocolError, match=r"^undecodable message: TypeError\("):
        protocol.decode(msgpack.packb(values))


@pytest.mark.parametrize("payload", [
    msgpack.packb(b"\x0ca"),  # bin: iterates as the ints 12, 97 -> Cancel(request_id=97)
    msgpack.packb(msgpack.ExtType(12, b"x")),  # ext: (code, data) -> Cancel(request_id=b"x")
], ids=["bin", "ext"])
def test_a_payload_that_is_not_an_array_raises_protocol_error(payload: bytes):
    with pytest.raises(ProtocolError):
        protocol.decode(payload)


# -- read_message -----------------------------------------------------------------------------

def read_from(data: bytes, max_frame_bytes: int = protocol.MAX_FRAME_BYTES,
              eof: bool = True) -> tuple[Any, bytes]:
    """Feed ``data`` to a StreamReader; return the message read and the bytes left unread."""
    async def read() -> tuple[Any, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        try:
            msg = await protocol.read_message(reader, max_frame_bytes)
        except ProtocolError as error:
            reader.feed_eof()
            return error, await reader.read()
        return msg, await reader.read()

    return asyncio.run(read())


def test_read_message_reads_frames_in_order():
    first, second = SAMPLES[protocol.Cancel], SAMPLES[protocol.QueueDepth]

    async def read_two() -> list:
        reader = asyncio.StreamReader()
        reader.feed_data(protocol.encode(first) + protocol.encode(second))
        reader.feed_eof()
        return [await protocol.read_message(reader), await protocol.read_message(reader)]

    assert asyncio.run(read_two()) == [first, second]


def test_a_frame_at_the_limit_is_read():
    frame = protocol.encode(SAMPLES[protocol.Cancel])
    assert read_from(frame, max_frame_bytes=len(frame) - 4) == (SAMPLES[protocol.Cancel], b"")


def test_a_frame_over_the_limit_is_refused_before_its_body_is_read():
    frame = protocol.encode(SAMPLES[protocol.Cancel])
    size = len(frame) - 4
    error, unread = read_from(frame, max_frame_bytes=size - 1)
    assert isinstance(error, ProtocolError)
    assert str(error) == f"frame of {size} bytes exceeds the {size - 1}-byte limit"
    assert unread == frame[4:]


def test_an_oversized_header_alone_is_refused_without_waiting_for_the_body():
    # No body and no EOF: reading the body would wait forever instead of raising.
    header = struct.pack(">I", protocol.MAX_FRAME_BYTES + 1)
    error, _ = read_from(header, eof=False)
    assert isinstance(error, ProtocolError)
    assert str(error) == "frame of 16777217 bytes exceeds the 16777216-byte limit"


@pytest.mark.parametrize("data", [b"", b"\x00\x00", struct.pack(">I", 10) + b"abc"],
                         ids=["nothing", "half-header", "short-body"])
def test_an_incomplete_frame_raises_incomplete_read(data: bytes):
    with pytest.raises(asyncio.IncompleteReadError):
        read_from(data)


# -- Fingerprint ------------------------------------------------------------------------------

def test_fingerprint_of_the_tiny_llama(tiny_llama_dir: Path):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    digest = hashlib.sha256((tiny_llama_dir / "tokenizer.json").read_bytes()
                            + (tiny_llama_dir / "tokenizer_config.json").read_bytes())
    fingerprint = Fingerprint.of_model(tiny_llama_dir, 16, "bfloat16", "fp8")
    assert fingerprint == Fingerprint(tiny_llama_dir.name, 2, 2, 16, 16, "bfloat16", "fp8",
                                      digest.hexdigest()[:16])
    assert (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim) == (
        config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"])


def test_fingerprint_derives_what_the_config_omits(tmp_path: Path):
    model_dir = tmp_path / "bare"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 3}))
    # head_dim from hidden_size / heads, kv heads = heads, and no tokenizer files hashed.
    assert Fingerprint.of_model(str(model_dir), 4, "float32", "auto") == Fingerprint(
        "bare", 3, 4, 16, 4, "float32", "auto", hashlib.sha256().hexdigest()[:16])


def test_fingerprint_changes_with_the_tokenizer(tiny_llama_dir: Path, tmp_path: Path):
    copy = tmp_path / tiny_llama_dir.name
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (copy / name).write_bytes((tiny_llama_dir / name).read_bytes())
    original = Fingerprint.of_model(tiny_llama_dir, 4, "float32", "auto")
    assert Fingerprint.of_model(copy, 4, "float32", "auto") == original
    (copy / "tokenizer_config.json").write_text("{}")
    changed = Fingerprint.of_model(copy, 4, "float32", "auto")
    assert original.mismatch(changed) == (
        f"tokenizer_hash={original.tokenizer_hash!r} vs {changed.tokenizer_hash!r}")


def test_mismatch_is_empty_when_equal():
    assert FINGERPRINT.mismatch(replace(FINGERPRINT)) == ""


def test_mismatch_names_each_differing_field_mine_then_theirs():
    theirs = replace(FINGERPRINT, num_layers=3, dtype="bfloat16")
    assert FINGERPRINT.mismatch(theirs) == "num_layers=2 vs 3, dtype='float32' vs 'bfloat16'"
    assert theirs.mismatch(FINGERPRINT) == "num_layers=3 vs 2, dtype='bfloat16' vs 'float32'"


@pytest.mark.parametrize("field,value", [
    ("model", "other"), ("num_layers", 3), ("num_kv_heads", 4), ("head_dim", 32),
    ("block_size", 16), ("dtype", "bfloat16"), ("kv_transfer_dtype", "auto"),
    ("tokenizer_hash", "fedcba9876543210"),
])
def test_mismatch_names_a_single_field(field: str, value: Any):
    mine = getattr(FINGERPRINT, field)
    assert FINGERPRINT.mismatch(replace(FINGERPRINT, **{field: value})) == (
        f"{field}={mine!r} vs {value!r}")


# -- handshake over local TCP -----------------------------------------------------------------

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

    def connect(self, role: str = "decode", fingerprint: Fingerprint = FINGERPRINT,
                secret: str = SECRET) -> transport.Connection:
        return self.loop.run(transport.open_connection(
            "127.0.0.1", self.port, role, fingerprint, secret,
            lambda connection, msg: self.messages.put(msg),
            lambda connection: self.closed.put(connection.peer)), WAIT_S)

    def raw(self, *msgs: Any) -> tuple[Any, bytes]:
        """Send ``msgs`` on a bare socket, read one reply, then what follows until EOF."""
        async def exchange() -> tuple[Any, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(b"".join(protocol.encode(m) for m in msgs))
            await writer.drain()
            reply = await protocol.read_message(reader)
            rest = await reader.read()
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
    client.connect(role="good").send(protocol.Cancel("from-good-peer"))
    assert server.messages.get(timeout=WAIT_S) == ("good", protocol.Cancel("from-good-peer"))
    assert server.messages.empty()


def test_a_matching_peer_exchanges_messages_both_ways(server: Server, client: Client):
    connection = client.connect(role="decode")
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
    (replace(FINGERPRINT, block_size=16), SECRET,
     "fingerprint mismatch (this worker vs peer): block_size=4 vs 16"),
    (replace(FINGERPRINT, model="other", tokenizer_hash="ffffffffffffffff"), SECRET,
     "fingerprint mismatch (this worker vs peer): model='tiny' vs 'other', "
     "tokenizer_hash='0123456789abcdef' vs 'ffffffffffffffff'"),
], ids=["secret", "block_size", "model-and-tokenizer"])
def test_a_mismatched_peer_is_refused_with_the_reason(
        server: Server, client: Client, fingerprint: Fingerprint, secret: str, reason: str):
    with pytest.raises(ProtocolError) as refused:
        client.connect(role="bad", fingerprint=fingerprint, secret=secret)
    assert str(refused.value) == f"127.0.0.1:{server.port} refused the connection: {reason}"
    assert_only_good_messages_arrive(server, client)
    assert server.closed.empty()  # a refused peer never became a connection


@pytest.mark.parametrize("first,reason", [
    (protocol.Hello(999, "bad", as_dict(FINGERPRINT), SECRET),
     "protocol version 999, this worker speaks 1"),
    (protocol.Cancel("sneaky"), "expected Hello first, got Cancel"),
], ids=["version", "not-hello"])
def test_a_raw_peer_is_refused_and_disconnected(
        server: Server, client: Client, first: Any, reason: str):
    reply, rest = client.raw(first)
    assert reply == protocol.HelloReply(False, reason, "server-0")
    assert rest == b""  # the server closed the connection after the refusal
    assert_only_good_messages_arrive(server, client)


def test_a_malformed_fingerprint_is_refused(server: Server, client: Client):
    reply, rest = client.raw(protocol.Hello(1, "bad", {"model": "tiny"}, SECRET))
    assert (reply.ok, rest) == (False, b"")
    assert reply.reason.startswith("malformed fingerprint: ")
    assert "missing 7 required positional arguments" in reply.reason


def oversize_after_handshake(client: Client) -> Any:
    """Shake hands, send a frame header over the limit, return what the server sends back
    (the IncompleteReadError when it just closes)."""
    async def exchange() -> Any:
        reader, writer, reply = await protocol.connect(
            "127.0.0.1", client.port, "client", FINGERPRINT, SECRET)
        assert reply == protocol.HelloReply(True, "", "server-0")
        writer.write(struct.pack(">I", protocol.MAX_FRAME_BYTES + 1))
        await writer.drain()
        try:
            return await protocol.read_message(reader)
        except asyncio.IncompleteReadError as error:
            return error
        finally:
            writer.close()

    return client.loop.run(exchange(), WAIT_S)


def test_a_frame_over_the_limit_closes_the_connection(server: Server, client: Client):
    oversize_after_handshake(client)
    assert server.closed.get(timeout=WAIT_S) == "client"
    assert server.messages.empty()


def test_a_frame_over_the_limit_is_answered_with_an_error(server: Server, client: Client):
    assert oversize_after_handshake(client) == protocol.Error(
        "frame of 16777217 bytes exceeds the 16777216-byte limit")
