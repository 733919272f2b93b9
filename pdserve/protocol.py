"""The request plane's wire: every message between router, decode and prefill workers.

A message is a frozen dataclass with a type tag; on the wire it is a msgpack array
``[tag, field, ...]`` inside a frame (4-byte big-endian length, then the payload). Frames over
the limit are refused before they are read. A connection opens with ``Hello`` (protocol
version, the peer's fingerprint, the cluster secret) answered by ``HelloReply``; a peer whose
version, secret or fingerprint differs is refused with a reason and disconnected.

Messages carry token ids, block ids and hashes, never tensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import msgpack

from pdserve.checkpoint_files import read_json

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the protocol (bad frame, unknown message, refused handshake)."""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What two peers must agree on to exchange token ids, block ids and KV."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    kv_transfer_dtype: str
    tokenizer_hash: str

    @classmethod
    def of_model(cls, model_dir: str | Path, block_size: int, dtype: str,
                 kv_transfer_dtype: str) -> Fingerprint:
        model_dir = Path(model_dir)
        config = read_json(model_dir / "config.json")
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        digest = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = model_dir / name
            if path.is_file():
                digest.update(path.read_bytes())
        return cls(model_dir.name, config["num_hidden_layers"],
                   config.get("num_key_value_heads", num_heads), head_dim, block_size, dtype,
                   kv_transfer_dtype, digest.hexdigest()[:16])

    def mismatch(self, other: Fingerprint) -> str:
        """Empty when equal, else which fields differ (mine vs theirs)."""
        return ", ".join(f"{f.name}={getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                         for f in fields(self) if getattr(self, f.name) != getattr(other, f.name))


_MESSAGES: dict[int, type] = {}


def message(tag: int):
    """Register a dataclass as a message type under ``tag``."""
    def register(cls):
        if tag in _MESSAGES:
            raise RuntimeError(f"message tag {tag} used twice")
        cls.TAG = tag
        _MESSAGES[tag] = cls
        return cls
    return register


# -- handshake ------------------------------------------------------------------------------

@message(1)
@dataclass(frozen=True, slots=True)
class Hello:
    TAG: ClassVar[int]
    version: int
    role: str  # "client", "decode", "prefill"
    fingerprint: dict
    secret: str


@message(2)
@dataclass(frozen=True, slots=True)
class HelloReply:
    TAG: ClassVar[int]
    ok: bool
    reason: str
    worker_id: str


# -- client <-> decode worker ---------------------------------------------------------------

@message(10)
@dataclass(frozen=True, slots=True)
class Generate:
    """Start a request; token chunks stream back on the same connection."""

    TAG: ClassVar[int]
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict  # SamplingParams fields
    priority: int = 0


@message(11)
@dataclass(frozen=True, slots=True)
class TokenChunk:
    """New tokens of a request; the last chunk has ``finished`` and a ``finish_reason``
    (``stop``, ``length``, ``abort``) or an ``error`` (the request failed, e.g. bad input)."""

    TAG: ClassVar[int]
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str = ""
    error: str = ""
    num_cached_tokens: int = 0


@message(12)
@dataclass(frozen=True, slots=True)
class Cancel:
    TAG: ClassVar[int]
    request_id: str


@message(13)
@dataclass(frozen=True, slots=True)
class Subscribe:
    """Ask for KV events and load reports; a ``KVSnapshot`` comes first."""

    TAG: ClassVar[int]


@message(14)
@dataclass(frozen=True, slots=True)
class KVEvents:
    """Prefix-cache changes ``[seq_start, seq_start + len(events))``: (kind, hash) pairs,
    kind ``stored`` or ``removed``. A gap in sequence numbers means events were lost."""

    TAG: ClassVar[int]
    worker_id: str
    seq_start: int
    events: list[list]


@message(15)
@dataclass(frozen=True, slots=True)
class KVSnapshot:
    """Every block hash the worker's prefix cache holds as of sequence number ``seq``."""

    TAG: ClassVar[int]
    worker_id: str
    seq: int
    block_hashes: list[int]


@message(16)
@dataclass(frozen=True, slots=True)
class Load:
    TAG: ClassVar[int]
    worker_id: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int


# -- decode worker <-> prefill worker -------------------------------------------------------

@message(20)
@dataclass(frozen=True, slots=True)
class PrefillJob:
    """Compute the KV of ``token_ids[:-1]`` and write the blocks decode lacks (those from
    ``num_cached_tokens`` on) into ``block_ids`` of the decode group ``agents`` (by rank)."""

    TAG: ClassVar[int]
    request_id: str
    attempt: int
    token_ids: list[int]
    num_cached_tokens: int
    agents: list[str]
    block_ids: list[int]
    timeout_s: float


@message(21)
@dataclass(frozen=True, slots=True)
class JobReply:
    TAG: ClassVar[int]
    request_id: str
    attempt: int
    accepted: bool
    reason: str = ""
    queue_depth: int = 0


@message(22)
@dataclass(frozen=True, slots=True)
class CancelJob:
    TAG: ClassVar[int]
    request_id: str
    attempt: int


@message(23)
@dataclass(frozen=True, slots=True)
class CancelJobReply:
    """``is_writing``: the job had started, so its writes end with a CANCELLED (or DONE)
    notice on the KV plane; otherwise it was dropped from the queue and nothing was sent."""

    TAG: ClassVar[int]
    request_id: str
    attempt: int
    is_writing: bool
    queue_depth: int = 0


@message(24)
@dataclass(frozen=True, slots=True)
class QueueDepth:
    TAG: ClassVar[int]
    queue_depth: int


@message(30)
@dataclass(frozen=True, slots=True)
class Error:
    TAG: ClassVar[int]
    message: str


# -- encoding -------------------------------------------------------------------------------

def encode(msg: Any) -> bytes:
    """One frame: length header and msgpack payload."""
    payload = msgpack.packb([msg.TAG, *_values(msg)])
    return _HEADER.pack(len(payload)) + payload


def _values(msg: Any) -> tuple:
    return tuple(getattr(msg, f.name) for f in fields(msg))


def decode(payload: bytes) -> Any:
    try:
        unpacked = msgpack.unpackb(payload, strict_map_key=False)
        if not isinstance(unpacked, list) or not unpacked:
            raise ValueError(f"expected a non-empty array, got {type(unpacked).__name__}")
        tag, *values = unpacked
        cls = _MESSAGES[tag]
        return cls(*values)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as error:
        raise ProtocolError(f"undecodable message: {error!r}") from None


async def read_message(reader: asyncio.StreamReader,
                       max_frame_bytes: int = MAX_FRAME_BYTES) -> Any:
    """The next message; ``asyncio.IncompleteReadError`` when the peer closed."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > max_frame_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_frame_bytes}-byte limit")
    return decode(await reader.readexactly(size))


# -- handshake ------------------------------------------------------------------------------

async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 fingerprint: Fingerprint, secret: str, worker_id: str) -> Hello:
    """Server side: read the peer's Hello and refuse a mismatch (then raise ProtocolError)."""
    hello = await read_message(reader)
    reason = _refusal(hello, fingerprint, secret)
    writer.write(encode(HelloReply(not reason, reason, worker_id)))
    await writer.drain()
    if reason:
        raise ProtocolError(reason)
    return hello


def _refusal(hello: Any, fingerprint: Fingerprint, secret: str) -> str:
    if not isinstance(hello, Hello):
        return f"expected Hello first, got {type(hello).__name__}"
    if hello.version != PROTOCOL_VERSION:
        return f"protocol version {hello.version}, this worker speaks {PROTOCOL_VERSION}"
    if not hmac.compare_digest(hello.secret.encode(), secret.encode()):
        return "wrong cluster secret"
    try:
        theirs = Fingerprint(**hello.fingerprint)
    except TypeError as error:
        return f"malformed fingerprint: {error}"
    differs = fingerprint.mismatch(theirs)
    return f"fingerprint mismatch (this worker vs peer): {differs}" if differs else ""


async def connect(host: str, port: int, role: str, fingerprint: Fingerprint, secret: str,
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, HelloReply]:
    """Client side: open a connection and shake hands; ProtocolError if refused."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(encode(Hello(PROTOCOL_VERSION, role, _as_dict(fingerprint), secret)))
    await writer.drain()
    reply = await read_message(reader)
    if not isinstance(reply, HelloReply) or not reply.ok:
        writer.close()
        reason = reply.reason if isinstance(reply, HelloReply) else type(reply).__name__
        raise ProtocolError(f"{host}:{port} refused the connection: {reason}")
    return reader, writer, reply


def _as_dict(fingerprint: Fingerprint) -> dict:
    return {f.name: getattr(fingerprint, f.name) for f in fields(fingerprint)}

