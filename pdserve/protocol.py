"""The request plane's wire: every message between router, decode and prefill workers.

A message is a frozen, tagged, array-like ``msgspec.Struct``; on the wire it is a msgpack
array ``[tag, field, ...]`` inside a frame
(4-byte big-endian length, then the payload). Frames over the limit are refused before they
are read. Decoding checks every field's type, nested Structs included, so a peer that sends
a string where token ids belong is refused at the edge with the message and field named
(``ProtocolError``), and the connection closes; nothing malformed reaches a worker.

A connection opens with ``Challenge`` (listener), ``Hello`` (dialler) and ``HelloReply``
(listener): a challenge and response that proves the dialler holds the cluster secret
without sending it (``pdserve/handshake.py``). Messages carry token ids, block ids and hashes,
never tensors.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import re
import struct
from pathlib import Path
from typing import Union

import msgspec

from pdserve.checkpoint_files import read_json
from pdserve.sampling import SamplingParams

PROTOCOL_VERSION = 4
MAX_FRAME_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the protocol (bad frame, unknown message, refused handshake)."""


class PeerRole(str, enum.Enum):
    """Who opened a request-plane connection."""

    CLIENT = "client"  # the cluster's own facade (Cluster.generate)
    ROUTER = "router"
    DECODE = "decode"
    PREFILL = "prefill"


class FinishReason(str, enum.Enum):
    """Why a request ended (a ``str`` Enum: it compares equal to its value)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    WORKER_LOST = "worker_lost"  # made by the request-plane client, never sent by a worker


class KVEventKind(str, enum.Enum):
    """A change to a decode worker's prefix cache."""

    STORED = "stored"
    REMOVED = "removed"


class Fingerprint(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What two peers must agree on to exchange token ids, block ids and KV."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    kv_transfer_dtype: str
    tokenizer_hash: str
    weights: str  # weight quantization (pdserve/quant_config.py): peers must agree

    @classmethod
    def of_model(cls, model_dir: str | Path, block_size: int, dtype: str,
                 kv_transfer_dtype: str, weights: str = "none") -> Fingerprint:
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
                   kv_transfer_dtype, digest.hexdigest()[:16], weights)

    def mismatch(self, other: Fingerprint) -> str:
        """Empty when equal, else which fields differ (mine vs theirs)."""
        return ", ".join(f"{name}={getattr(self, name)!r} vs {getattr(other, name)!r}"
                         for name in self.__struct_fields__
                         if getattr(self, name) != getattr(other, name))


class KVEvent(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One prefix-cache change: a block hash stored or removed."""

    kind: KVEventKind
    block_hash: int


class Message(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The base of every request-plane message; a subclass sets its wire ``tag``."""


# -- handshake ------------------------------------------------------------------------------

class Hello(Message, tag=1):
    """The dialling side's answer to ``Challenge``: who it is, and ``proof`` that it holds
    the cluster secret (``hello_proof``)."""

    version: int
    role: PeerRole
    fingerprint: Fingerprint
    proof: bytes


class Challenge(Message, tag=3):
    """The first message of a connection, from the side that listens: a nonce never sent
    before, which the dialling side's ``Hello`` must prove it holds the secret against."""

    version: int
    nonce: bytes


class HelloReply(Message, tag=2):
    """The answer to ``Hello``: accepted, or refused with a reason."""

    ok: bool
    reason: str
    worker_id: str


# -- client <-> decode worker ---------------------------------------------------------------

class Generate(Message, tag=10):
    """Start a request; token chunks stream back on the same connection."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0


class TokenChunk(Message, tag=11):
    """New tokens of a request; the last chunk has ``finished`` and a ``finish_reason``, or
    an ``error`` (the request failed, e.g. bad input)."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str = ""
    num_cached_tokens: int = 0


class Cancel(Message, tag=12):
    """Stop a request; its worker answers with a last chunk (``abort``)."""

    request_id: str


class Subscribe(Message, tag=13):
    """Ask for KV events and load reports; a ``KVSnapshot`` comes first."""


class KVEvents(Message, tag=14):
    """Prefix-cache changes ``[seq_start, seq_start + len(events))``. A gap in sequence
    numbers means events were lost."""

    worker_id: str
    seq_start: int
    events: list[KVEvent]


class KVSnapshot(Message, tag=15):
    """Every block hash the worker's prefix cache holds as of sequence number ``seq``."""

    worker_id: str
    seq: int
    block_hashes: list[int]


class Load(Message, tag=16):
    """A decode worker's load, sent to subscribers whenever it changed."""

    worker_id: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int


# -- decode worker <-> prefill worker -------------------------------------------------------

class PrefillJob(Message, tag=20):
    """Compute the KV of ``token_ids[:-1]`` and write the blocks decode lacks (those from
    ``num_cached_tokens`` on) into ``block_ids`` of the decode group ``agents`` (by rank)."""

    request_id: str
    attempt: int
    token_ids: list[int]
    num_cached_tokens: int
    agents: list[str]
    block_ids: list[int]
    timeout_s: float


class JobReply(Message, tag=21):
    """A prefill worker took a job, or refused it with a reason."""

    request_id: str
    attempt: int
    accepted: bool
    reason: str = ""
    queue_depth: int = 0


class CancelJob(Message, tag=22):
    """Decode gives up on one attempt of a remote prefill."""

    request_id: str
    attempt: int


class CancelJobReply(Message, tag=23):
    """``is_writing``: the job had started, so its writes end with a CANCELLED (or DONE)
    notice on the KV plane; otherwise it was dropped from the queue and nothing was sent."""

    request_id: str
    attempt: int
    is_writing: bool
    queue_depth: int = 0


class QueueDepth(Message, tag=24):
    """A prefill worker's queue depth, sent whenever a job ends."""

    queue_depth: int


class Error(Message, tag=30):
    """The peer is closing the connection because of this."""

    message: str


MESSAGES: dict[int, type[Message]] = {
    cls.__struct_config__.tag: cls
    for cls in (Hello, HelloReply, Challenge, Generate, TokenChunk, Cancel, Subscribe,
                KVEvents, KVSnapshot, Load, PrefillJob, JobReply, CancelJob, CancelJobReply,
                QueueDepth, Error)
}
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Union[tuple(MESSAGES.values())])  # noqa: UP007
_INDEX = re.compile(r"^\$\[(\d+)\]")


def tag_of(cls: type[Message]) -> int:
    return cls.__struct_config__.tag


# -- encoding -------------------------------------------------------------------------------

def encode(msg: Message) -> bytes:
    """One frame: length header and msgpack payload."""
    payload = _ENCODER.encode(msg)
    return _HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> Message:
    """The message in ``payload``; ``ProtocolError`` naming the message and field when a
    value has the wrong type, a field is missing or extra, or the bytes are not msgpack."""
    try:
        return _DECODER.decode(payload)
    except msgspec.ValidationError as error:
        raise ProtocolError(f"undecodable message: {_locate(payload, str(error))}") from None
    except msgspec.DecodeError as error:
        raise ProtocolError(f"undecodable message: {error}") from None


def _locate(payload: bytes, reason: str) -> str:
    """``reason`` with the message type and the field its ``$[i]`` path points at."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return reason
    if type(raw) is not list or not raw or type(raw[0]) is not int or raw[0] not in MESSAGES:
        return reason
    cls = MESSAGES[raw[0]]
    match = _INDEX.match(reason.rpartition(" - at `")[2])
    names = cls.__struct_fields__
    if match and 1 <= int(match.group(1)) <= len(names):
        return f"{cls.__name__}.{names[int(match.group(1)) - 1]}: {reason}"
    return f"{cls.__name__}: {reason}"


async def read_frame(reader: asyncio.StreamReader,
                     max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """The next frame's payload; ``asyncio.IncompleteReadError`` when the peer closed."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > max_frame_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_frame_bytes}-byte limit")
    return await reader.readexactly(size)


async def read_message(reader: asyncio.StreamReader,
                       max_frame_bytes: int = MAX_FRAME_BYTES) -> Message:
    """The next message; ``asyncio.IncompleteReadError`` when the peer closed."""
    return decode(await read_frame(reader, max_frame_bytes))
