"""Prefix-cache block hashes, identical in every process and on every machine.

A block's hash chains its parent's hash with its token ids, so equal hashes mean equal
prefixes. The digest is sha256 (never Python's salted ``hash()``) over the parent hash as
8 little-endian bytes followed by the token ids as little-endian int32, truncated to 64 bits
so hashes travel as plain msgpack integers. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# The parent of the first block: a fixed seed shared by router, prefill and decode.
ROOT_HASH = int.from_bytes(hashlib.sha256(b"pdserve-block-hash-v1").digest()[:8], "little")


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash one full block given the hash of the block before it (``ROOT_HASH`` for the first)."""
    payload = struct.pack(f"<Q{len(token_ids)}i", parent_hash, *token_ids)
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def hash_blocks(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of ``token_ids``; a trailing partial block has none."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
