"""Paged KV block allocation with a prefix cache. Pure Python: block ids, never tensors.

Each request owns a list of block ids (its block table). Full blocks are hashed
(``pdserve.hashing``) once their KV is computed and entered into the prefix cache; a later
request whose prompt starts with the same tokens takes a reference on them instead of
recomputing. A block whose reference count drops to 0 goes to the back of the free queue
but keeps its hash, so it can still be hit until it is handed out again (LRU eviction)::

    free queue (front = evicted first)      hash -> block
    [ 7 | 3 | 12 | 5 ]                      h(a)   -> 3   (free, still cached)
                                            h(a,b) -> 9   (in use, ref_count 2)

Running out of blocks is not an error: ``allocate`` returns None and the scheduler preempts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from pdserve.hashing import ROOT_HASH, hash_block
from pdserve.protocol import KVEvent, KVEventKind


@dataclass(slots=True)
class Block:
    """One pool block's bookkeeping: how many requests hold it and, once it is full and
    cached, its hash and its token ids (compared on a hit to guard against collisions)."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class PrefixMatch(NamedTuple):
    """Cached blocks that hold a prompt's first ``num_tokens`` tokens, in order."""

    block_ids: list[int]
    num_tokens: int


@dataclass(slots=True)
class _Table:
    block_ids: list[int]
    num_hashed_blocks: int
    last_hash: int


class BlockManager:
    """Owns the pool's block ids, every request's block table and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._tables: dict[str, _Table] = {}
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (front first); for tests and debugging."""
        return list(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        return table.block_ids if table else []

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def cached_hashes(self) -> list[int]:
        """Every hash the prefix cache holds now (a snapshot for a router that lost events)."""
        return list(self._cached)

    def match_prefix(self, token_ids: list[int]) -> PrefixMatch:
        """The longest cached run of full blocks at the start of ``token_ids``.

        The last token is never matched: it must be computed to produce logits, and it
        must not be written into a block other requests share.
        """
        if not self.enable_prefix_caching:
            return PrefixMatch([], 0)
        block_ids: list[int] = []
        parent = ROOT_HASH
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(token_ids[start : start + self.block_size])
            parent = hash_block(parent, chunk)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            block_ids.append(block_id)
        return PrefixMatch(block_ids, len(block_ids) * self.block_size)

    def allocate(self, request_id: str, num_tokens: int,
                 prefix: PrefixMatch | None = None) -> list[int] | None:
        """Grow the request's table to hold ``num_tokens`` tokens; None if the pool is short.

        ``prefix`` (on the first call only) is a ``match_prefix`` result whose blocks the
        request shares. On None nothing has changed.
        """
        table = self._tables.get(request_id)
        shared = prefix.block_ids if (prefix and table is None) else []
        num_held = len(table.block_ids) if table else len(shared)
        num_new = max(0, self.num_blocks_for(num_tokens) - num_held)
        num_free_shared = sum(1 for b in shared if self.blocks[b].ref_count == 0)
        if num_new + num_free_shared > self.num_free_blocks:
            return None
        if table is None:
            table = _Table([], 0, ROOT_HASH)
            self._tables[request_id] = table
            for block_id in shared:
                self._take(block_id)
                table.block_ids.append(block_id)
            table.num_hashed_blocks = len(shared)
            if shared:
                table.last_hash = self.blocks[shared[-1]].block_hash
        for _ in range(num_new):
            table.block_ids.append(self._take_fresh())
        return table.block_ids

    def cache_full_blocks(self, request_id: str, token_ids: list[int],
                          num_computed_tokens: int) -> None:
        """Enter the request's blocks that are full and computed into the prefix cache."""
        table = self._tables.get(request_id)
        if table is None or not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table.block_ids))
        for index in range(table.num_hashed_blocks, num_full):
            start = index * self.block_size
            chunk = tuple(token_ids[start : start + self.block_size])
            table.last_hash = hash_block(table.last_hash, chunk)
            block = self.blocks[table.block_ids[index]]
            if table.last_hash not in self._cached:
                block.block_hash, block.token_ids = table.last_hash, chunk
                self._cached[table.last_hash] = block.block_id
                self._events.append(KVEvent(KVEventKind.STORED, table.last_hash))
        table.num_hashed_blocks = max(table.num_hashed_blocks, num_full)

    def rename(self, request_id: str, new_id: str) -> None:
        """Hand a request's blocks to another owner id (which must be unused)."""
        if new_id in self._tables:
            raise ValueError(f"{new_id!r} already owns blocks")
        table = self._tables.pop(request_id, None)
        if table is not None:
            self._tables[new_id] = table

    def free(self, request_id: str) -> None:
        """Release the request's blocks. Tail blocks go first into the free queue, so a
        shared prefix outlives the request-specific suffix."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than taken")
            if block.ref_count == 0:
                self._free[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
                self._events.append(KVEvent(KVEventKind.REMOVED, block.block_hash))
            block.block_hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id
