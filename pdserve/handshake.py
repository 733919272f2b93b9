"""How a request-plane connection opens: a challenge and response over the cluster secret.

```
listener                                   dialler
   ── Challenge(version, nonce) ─────────────▶   nonce: 32 random bytes, new per connection
   ◀──── Hello(version, role, fingerprint, proof)
         proof = HMAC-SHA256(secret, [context, nonce, version, role, fingerprint])
   ── HelloReply(ok, reason, worker_id) ────▶   refused: the reason, then the close
```

The secret never goes on the wire, and a proof is good for one connection (its nonce) and
for what its Hello claims (role, fingerprint): a captured Hello opens nothing. The listener
checks, in order, the version (read before the rest is decoded, so a peer of another
version is told so even if its Hello has another layout), the proof
(``hmac.compare_digest``) and the fingerprint. Nothing is encrypted, and only the opening is
authenticated: whoever can read or inject traffic between two workers can still read and
forge what follows, so the request plane belongs on a trusted network.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec

from pdserve.protocol import (
    PROTOCOL_VERSION,
    Challenge,
    Fingerprint,
    Hello,
    HelloReply,
    Message,
    PeerRole,
    ProtocolError,
    decode,
    encode,
    read_frame,
    read_message,
    tag_of,
)

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that says nothing is dropped, not waited for
NONCE_BYTES = 32
_PROOF_CONTEXT = "pdserve-hello"  # a proof means nothing outside this handshake
_ENCODER = msgspec.msgpack.Encoder()
_T = TypeVar("_T")


def hello_proof(secret: str, nonce: bytes, version: int, role: PeerRole,
                fingerprint: Fingerprint) -> bytes:
    """The proof a ``Hello`` carries: HMAC-SHA256 keyed by the cluster secret over the
    challenge's nonce and what the Hello claims."""
    signed = _ENCODER.encode((_PROOF_CONTEXT, nonce, version, role, fingerprint))
    return hmac.new(secret.encode(), signed, hashlib.sha256).digest()


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 fingerprint: Fingerprint, secret: str, worker_id: str) -> Hello:
    """Listener side: challenge the peer, read its Hello and refuse a mismatch (then raise
    ProtocolError); ProtocolError too when it sends nothing within the handshake timeout."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    writer.write(encode(Challenge(PROTOCOL_VERSION, nonce)))
    await writer.drain()
    payload = await _within_timeout(read_frame(reader), "Hello")
    reason = _version_refusal(payload)
    hello = None if reason else decode(payload)  # malformed: ProtocolError, no reply
    reason = reason or _refusal(hello, nonce, fingerprint, secret)
    writer.write(encode(HelloReply(not reason, reason, worker_id)))
    await writer.drain()
    if reason:
        raise ProtocolError(reason)
    return hello


def _version_refusal(payload: bytes) -> str:
    """The refusal of a Hello of another protocol version, from its first two values
    whatever the rest holds; empty when the payload is not one."""
    try:
        values = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return ""  # decode() says what is wrong
    if (type(values) is list and len(values) > 1 and values[0] == tag_of(Hello)
            and type(values[1]) is int and values[1] != PROTOCOL_VERSION):
        return f"protocol version {values[1]}, this worker speaks {PROTOCOL_VERSION}"
    return ""


def _refusal(hello: Message | None, nonce: bytes, fingerprint: Fingerprint,
             secret: str) -> str:
    if not isinstance(hello, Hello):
        return f"expected Hello first, got {type(hello).__name__}"
    expected = hello_proof(secret, nonce, hello.version, hello.role, hello.fingerprint)
    if not hmac.compare_digest(hello.proof, expected):
        return "wrong cluster secret"
    differs = fingerprint.mismatch(hello.fingerprint)
    return f"fingerprint mismatch (this worker vs peer): {differs}" if differs else ""


async def connect(host: str, port: int, role: PeerRole, fingerprint: Fingerprint, secret: str,
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, HelloReply]:
    """Dialler side: open a connection and answer its challenge; ProtocolError when the
    handshake fails or the peer refuses."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        nonce = await _challenge(reader)
        proof = hello_proof(secret, nonce, PROTOCOL_VERSION, role, fingerprint)
        writer.write(encode(Hello(PROTOCOL_VERSION, role, fingerprint, proof)))
        await writer.drain()
        reply = await _within_timeout(read_message(reader), "HelloReply")
    except (ProtocolError, asyncio.IncompleteReadError) as error:
        writer.close()
        reason = ("it closed the connection" if isinstance(error, asyncio.IncompleteReadError)
                  else str(error))
        raise ProtocolError(f"handshake with {host}:{port} failed: {reason}") from None
    if not isinstance(reply, HelloReply) or not reply.ok:
        writer.close()
        reason = reply.reason if isinstance(reply, HelloReply) else type(reply).__name__
        raise ProtocolError(f"{host}:{port} refused the connection: {reason}")
    return reader, writer, reply


async def _challenge(reader: asyncio.StreamReader) -> bytes:
    """The nonce of the listener's Challenge, once its version is known to be ours."""
    challenge: Any = await _within_timeout(read_message(reader), "Challenge")
    if not isinstance(challenge, Challenge):
        raise ProtocolError(f"expected Challenge first, got {type(challenge).__name__}")
    if challenge.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {challenge.version}, this process speaks "
                            f"{PROTOCOL_VERSION}")
    return challenge.nonce


async def _within_timeout(read: Awaitable[_T], expected: str) -> _T:
    try:
        return await asyncio.wait_for(read, HANDSHAKE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ProtocolError(f"no {expected} within {HANDSHAKE_TIMEOUT_S:g} s") from None
