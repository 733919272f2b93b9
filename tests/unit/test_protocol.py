"""The request plane's wire (pdserve.protocol); the handshake and connections over it are in
test_handshake.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest

from pdserve import protocol
from pdserve.protocol import (
    Fingerprint,
    FinishReason,
    KVEvent,
    KVEventKind,
    PeerRole,
    ProtocolError,
)
from pdserve.sampling import SamplingParams

FINGERPRINT = Fingerprint("tiny", 2, 2, 16, 4, "float32", "fp8", "0123456789abcdef", "none")
SAMPLING = SamplingParams(max_tokens=8, temperature=0.5, top_k=40, top_p=0.9, seed=1234,
                          stop_token_ids=(7, 2), ignore_eos=True, output_logits=True,
                          output_offset=3)

# One instance of every message, each field away from its default so that a field dropped or
# swapped on the wire shows. Hashes use the full unsigned 64-bit range.
SAMPLES = {
    protocol.Hello: protocol.Hello(protocol.PROTOCOL_VERSION, PeerRole.PREFILL, FINGERPRINT,
                                   b"\x00proof\xff"),
    protocol.HelloReply: protocol.HelloReply(False, "wrong cluster secret", "decode-0"),
    protocol.Challenge: protocol.Challenge(protocol.PROTOCOL_VERSION, b"\x01nonce\xfe"),
    protocol.Generate: protocol.Generate("req-1", [1, 2, 3], SAMPLING, 2),
    protocol.TokenChunk: protocol.TokenChunk(
        "req-1", [4, 5], True, FinishReason.LENGTH, "bad input", 16),
    protocol.Cancel: protocol.Cancel("req-1"),
    protocol.Subscribe: protocol.Subscribe(),
    protocol.KVEvents: protocol.KVEvents(
        "decode-0", 41,
        [KVEvent(KVEventKind.STORED, 2**64 - 1), KVEvent(KVEventKind.REMOVED, 0)]),
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


def frame_of(values: Any) -> bytes:
    """A well-framed payload of arbitrary msgpack ``values`` (what a broken peer may send)."""
    payload = msgpack.packb(values)
    return struct.pack(">I", len(payload)) + payload


def wire_of(msg: protocol.Message) -> list:
    """``msg`` as the plain msgpack array it travels as."""
    return msgpack.unpackb(payload_of(protocol.encode(msg)))


def broken(msg: protocol.Message, path: tuple[int, ...], value: Any) -> list:
    """The wire array of ``msg`` with the value at ``path`` (indices, tag at 0) replaced."""
    values = wire_of(msg)
    inner = values
    for index in path[:-1]:
        inner = inner[index]
    inner[path[-1]] = value
    return values


# -- encode / decode --------------------------------------------------------------------------

def test_every_message_type_is_registered_and_has_a_sample():
    assert set(protocol.MESSAGES.values()) == set(protocol.Message.__subclasses__())
    assert set(SAMPLES) == set(protocol.MESSAGES.values())


def test_tags_are_pinned_and_unique():
    # The tags are the wire format: changing one breaks every peer of another version.
    assert {tag: cls.__name__ for tag, cls in protocol.MESSAGES.items()} == {
        1: "Hello", 2: "HelloReply", 3: "Challenge", 10: "Generate", 11: "TokenChunk", 12: "Cancel",
        13: "Subscribe", 14: "KVEvents", 15: "KVSnapshot", 16: "Load", 20: "PrefillJob",
        21: "JobReply", 22: "CancelJob", 23: "CancelJobReply", 24: "QueueDepth", 30: "Error",
    }
    assert all(protocol.tag_of(cls) == tag for tag, cls in protocol.MESSAGES.items())
    assert len({protocol.tag_of(cls) for cls in protocol.Message.__subclasses__()}) == 16


@pytest.mark.parametrize("msg", [*SAMPLES.values(), SAMPLING], ids=lambda m: type(m).__name__)
def test_samples_set_every_field_away_from_its_default(msg: msgspec.Struct):
    for field in msgspec.structs.fields(msg):
        if field.default is not msgspec.NODEFAULT:
            assert getattr(msg, field.name) != field.default, field.name


@pytest.mark.parametrize("msg", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_round_trip(msg: protocol.Message):
    decoded = protocol.decode(payload_of(protocol.encode(msg)))
    assert decoded == msg
    assert type(decoded) is type(msg)


def test_nested_values_decode_to_their_types():
    # A str Enum equals its value, so == alone would not tell "length" from LENGTH.
    def round_trip(msg: protocol.Message) -> Any:
        return protocol.decode(payload_of(protocol.encode(msg)))

    hello = round_trip(SAMPLES[protocol.Hello])
    assert hello.role is PeerRole.PREFILL
    assert type(hello.fingerprint) is Fingerprint
    generate = round_trip(SAMPLES[protocol.Generate])
    assert type(generate.sampling) is SamplingParams
    assert generate.sampling.stop_token_ids == (7, 2)
    assert round_trip(SAMPLES[protocol.TokenChunk]).finish_reason is FinishReason.LENGTH
    events = round_trip(SAMPLES[protocol.KVEvents]).events
    assert [type(event) for event in events] == [KVEvent, KVEvent]
    assert [event.kind for event in events] == [KVEventKind.STORED, KVEventKind.REMOVED]
    assert all(type(event.kind) is KVEventKind for event in events)


@pytest.mark.parametrize("msg", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_frame_is_length_header_then_tagged_array(msg: protocol.Message):
    frame = protocol.encode(msg)
    payload = payload_of(frame)
    assert frame[:4] == struct.pack(">I", len(payload))
    values = msgpack.unpackb(payload)
    assert values[0] == protocol.tag_of(type(msg))
    assert len(values) == 1 + len(msg.__struct_fields__)  # every field, defaults included


def test_nested_structs_travel_as_arrays_in_field_order():
    assert wire_of(SAMPLES[protocol.Generate]) == [
        10, "req-1", [1, 2, 3], [8, 0.5, 40, 0.9, 1234, [7, 2], True, True, 3], 2]
    assert wire_of(SAMPLES[protocol.Hello]) == [
        1, 4, "prefill", ["tiny", 2, 2, 16, 4, "float32", "fp8", "0123456789abcdef", "none"],
        b"\x00proof\xff"]
    assert wire_of(SAMPLES[protocol.Challenge]) == [3, 4, b"\x01nonce\xfe"]
    assert wire_of(SAMPLES[protocol.KVEvents]) == [
        14, "decode-0", 41, [["stored", 2**64 - 1], ["removed", 0]]]
    assert wire_of(SAMPLES[protocol.TokenChunk])[4] == "length"


def test_defaults_are_filled_when_a_peer_sends_fewer_fields():
    payload = msgpack.packb([protocol.tag_of(protocol.TokenChunk), "req-1", [4]])
    assert protocol.decode(payload) == protocol.TokenChunk("req-1", [4], False, None, "", 0)


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
    with pytest.raises(ProtocolError) as error:
        protocol.decode(msgpack.packb([99, "x"]))
    assert str(error.value) == "undecodable message: Invalid value 99 - at `$[0]`"


# msgspec counts the tag in "at least" but not in "at most" (there, lengths are field counts).
@pytest.mark.parametrize("values,reason", [
    ([12], "Cancel: Expected `array` of at least length 2, got 1"),  # too few
    ([12, "req-1", "extra"], "Cancel: Expected `array` of at most length 1, got 2"),
    ([13, "extra"], "Subscribe: Expected `array` of at most length 0, got 1"),
    ([16, "decode-0", 1, 2, 3], "Load: Expected `array` of at least length 6, got 5"),
    ([11, "req-1", [1], True, "stop", "", 0, "extra"],
     "TokenChunk: Expected `array` of at most length 6, got 7"),
], ids=["too-few", "too-many", "empty-message-extra", "one-short", "one-over"])
def test_wrong_field_count_raises_protocol_error_naming_the_message(values: list, reason: str):
    with pytest.raises(ProtocolError) as error:
        protocol.decode(msgpack.packb(values))
    assert str(error.value) == f"undecodable message: {reason}"


@pytest.mark.parametrize("payload", [
    msgpack.packb(b"\x0ca"),  # bin: would iterate as the ints 12, 97
    msgpack.packb(msgpack.ExtType(12, b"x")),
    msgpack.packb("\x0creq-1"),
    msgpack.packb({0: 12, 1: "req-1"}),
], ids=["bin", "ext", "str", "map"])
def test_a_payload_that_is_not_an_array_raises_protocol_error(payload: bytes):
    with pytest.raises(ProtocolError, match="^undecodable message: .*Expected `array`, got "):
        protocol.decode(payload)


# Each case breaks one value of a good sample; the error names the message and the field the
# value sits under (msgspec's reason, with its path, follows).
MALFORMED = {
    "token-id-str": (
        broken(SAMPLES[protocol.Generate], (2, 1), "two"),
        "Generate.prompt_token_ids: Expected `int`, got `str` - at `$[2][1]`"),
    "max-tokens-0": (
        broken(SAMPLES[protocol.Generate], (3, 0), 0),
        "Generate.sampling: max_tokens=0 is invalid: must be an integer in [1, 2147483647] "
        "or None - at `$[3]`"),
    "top-p-2": (
        broken(SAMPLES[protocol.Generate], (3, 3), 2.0),
        "Generate.sampling: top_p=2.0 is invalid: must be in (0, 1] - at `$[3]`"),
    "ignore-eos-int": (
        broken(SAMPLES[protocol.Generate], (3, 6), 1),
        "Generate.sampling: Expected `bool`, got `int` - at `$[3][6]`"),
    "sampling-map": (
        broken(SAMPLES[protocol.Generate], (3,), {"max_tokens": 8}),
        "Generate.sampling: Expected `array`, got `object` - at `$[3]`"),
    "finish-reason": (
        broken(SAMPLES[protocol.TokenChunk], (4,), "done"),
        "TokenChunk.finish_reason: Invalid enum value 'done' - at `$[4]`"),
    "kv-event-kind": (
        broken(SAMPLES[protocol.KVEvents], (3, 1, 0), "evicted"),
        "KVEvents.events: Invalid enum value 'evicted' - at `$[3][1][0]`"),
    "block-hash-str": (
        broken(SAMPLES[protocol.KVEvents], (3, 0, 1), "ff"),
        "KVEvents.events: Expected `int`, got `str` - at `$[3][0][1]`"),
    "fingerprint-short": (
        broken(SAMPLES[protocol.Hello], (3,), wire_of(SAMPLES[protocol.Hello])[3][:-1]),
        "Hello.fingerprint: Expected `array` of at least length 9, got 8 - at `$[3]`"),
    "fingerprint-layers-str": (
        broken(SAMPLES[protocol.Hello], (3, 1), "2"),
        "Hello.fingerprint: Expected `int`, got `str` - at `$[3][1]`"),
    "role": (
        broken(SAMPLES[protocol.Hello], (2,), "intruder"),
        "Hello.role: Invalid enum value 'intruder' - at `$[2]`"),
    "proof-str": (  # a secret in clear, as protocol version 3 sent it
        broken(SAMPLES[protocol.Hello], (4,), "s3cret"),
        "Hello.proof: Expected `bytes`, got `str` - at `$[4]`"),
    "count-bool": (
        broken(SAMPLES[protocol.Load], (5,), True),
        "Load.num_blocks: Expected `int`, got `bool` - at `$[5]`"),
    "request-id-nil": (
        broken(SAMPLES[protocol.Cancel], (1,), None),
        "Cancel.request_id: Expected `str`, got `None` - at `$[1]`"),
}


@pytest.mark.parametrize("values,reason", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_wrong_value_anywhere_raises_protocol_error_naming_the_field(values: list,
                                                                        reason: str):
    with pytest.raises(ProtocolError) as error:
        protocol.decode(msgpack.packb(values))
    assert str(error.value) == f"undecodable message: {reason}"


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


def test_a_malformed_frame_is_consumed_whole_and_the_next_one_reads():
    first = frame_of(MALFORMED["token-id-str"][0])
    error, unread = read_from(first + protocol.encode(SAMPLES[protocol.Cancel]))
    assert isinstance(error, ProtocolError)
    assert unread == protocol.encode(SAMPLES[protocol.Cancel])


# -- Fingerprint ------------------------------------------------------------------------------

def test_fingerprint_of_the_tiny_llama(tiny_llama_dir: Path):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    digest = hashlib.sha256((tiny_llama_dir / "tokenizer.json").read_bytes()
                            + (tiny_llama_dir / "tokenizer_config.json").read_bytes())
    fingerprint = Fingerprint.of_model(tiny_llama_dir, 16, "bfloat16", "fp8")
    assert fingerprint == Fingerprint(tiny_llama_dir.name, 2, 2, 16, 16, "bfloat16", "fp8",
                                      digest.hexdigest()[:16], "none")
    assert (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim) == (
        config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"])


def test_fingerprint_derives_what_the_config_omits(tmp_path: Path):
    model_dir = tmp_path / "bare"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 3}))
    # head_dim from hidden_size / heads, kv heads = heads, and no tokenizer files hashed.
    assert Fingerprint.of_model(str(model_dir), 4, "float32", "auto") == Fingerprint(
        "bare", 3, 4, 16, 4, "float32", "auto", hashlib.sha256().hexdigest()[:16], "none")


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


def test_fingerprint_fields_are_pinned():
    # Their order is the wire layout of Hello.fingerprint.
    assert Fingerprint.__struct_fields__ == (
        "model", "num_layers", "num_kv_heads", "head_dim", "block_size", "dtype",
        "kv_transfer_dtype", "tokenizer_hash", "weights")


def test_weight_quantization_is_part_of_the_fingerprint():
    int8 = msgspec.structs.replace(FINGERPRINT, weights="int8-channel-act-none")
    assert FINGERPRINT.mismatch(int8) == "weights='none' vs 'int8-channel-act-none'"


def test_mismatch_is_empty_when_equal():
    assert FINGERPRINT.mismatch(msgspec.structs.replace(FINGERPRINT)) == ""


def test_mismatch_names_each_differing_field_mine_then_theirs():
    theirs = msgspec.structs.replace(FINGERPRINT, num_layers=3, dtype="bfloat16")
    assert FINGERPRINT.mismatch(theirs) == "num_layers=2 vs 3, dtype='float32' vs 'bfloat16'"
    assert theirs.mismatch(FINGERPRINT) == "num_layers=3 vs 2, dtype='bfloat16' vs 'float32'"


@pytest.mark.parametrize("field,value", [
    ("model", "other"), ("num_layers", 3), ("num_kv_heads", 4), ("head_dim", 32),
    ("block_size", 16), ("dtype", "bfloat16"), ("kv_transfer_dtype", "auto"),
    ("tokenizer_hash", "fedcba9876543210"),
])
def test_mismatch_names_a_single_field(field: str, value: Any):
    mine = getattr(FINGERPRINT, field)
    assert FINGERPRINT.mismatch(msgspec.structs.replace(FINGERPRINT, **{field: value})) == (
        f"{field}={mine!r} vs {value!r}")
