"""What a worker reports about itself: typed counters, read by the cluster and the router.

A decode or prefill worker's rank 0 builds one of these on a ``GetStats`` command; the
cluster hands them to the router's metrics collector and to tests. They are msgspec Structs,
so they travel over Ray (or the request plane) as they are, and a reader names fields, never
dictionary keys.
"""

from __future__ import annotations

import enum

import msgspec


class Role(enum.Enum):
    """The two kinds of worker."""

    DECODE = "decode"
    PREFILL = "prefill"


class PrefillCounts(msgspec.Struct, frozen=True):
    """Prompts a decode worker prefilled, by where: on itself, on a prefill worker, or on
    itself after the remote prefill failed."""

    local: int = 0
    remote: int = 0
    fallback: int = 0


class DecodeRankCounts(msgspec.Struct, frozen=True):
    """One decode rank's KV-plane state (idle: nothing expected, staging all free)."""

    num_expected: int
    num_free_staging_blocks: int
    num_live_handles: int


class PrefillRankCounts(msgspec.Struct, frozen=True):
    """One prefill rank's KV-plane state (idle: send buffer all free)."""

    num_free_send_blocks: int
    num_live_handles: int


class DecodeStats(msgspec.Struct, frozen=True, kw_only=True):
    """A decode worker's counters (cumulative) and state (as of the report)."""

    worker_id: str
    decisions: dict[str, int]  # "where:reason" -> requests decided so
    prefills: PrefillCounts
    prompt_tokens_computed: int
    num_finished: int
    # remote KV that landed but failed its digests (kv_transfer_checksum); each fell back
    checksum_failures: int = 0
    num_running: int
    num_waiting: int
    num_waiting_for_remote_kv: int
    num_remote: int
    num_stale: int
    num_streams: int
    num_free_blocks: int
    num_blocks: int
    max_model_len: int
    ranks: list[DecodeRankCounts]
    prefill_peers: dict[str, bool]  # prefill worker id -> healthy
    num_subscribers: int
    rss_bytes: int

    @property
    def role(self) -> Role:
        return Role.DECODE


class PrefillStats(msgspec.Struct, frozen=True, kw_only=True):
    """A prefill worker's counters (cumulative) and state (as of the report)."""

    worker_id: str
    jobs_done: int
    jobs_failed: int
    jobs_cancelled: int
    bytes_sent: int
    prompt_tokens_computed: int
    queue_depth: int
    num_active: int
    num_free_blocks: int
    num_blocks: int
    num_connections: int
    rss_bytes: int
    ranks: list[PrefillRankCounts]

    @property
    def role(self) -> Role:
        return Role.PREFILL


WorkerStats = DecodeStats | PrefillStats
