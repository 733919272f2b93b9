"""A seam for tests: where a worker may be watched or paused, and a default that does nothing.

The cluster hands one ``Probe`` to every worker it starts (``cluster.launch(config,
probe=...)``). Production passes none and gets this class, whose methods return at once; a
test passes a subclass that, say, blocks the decode loop after a chosen request's second token
until the test releases it.
"""

from __future__ import annotations

from typing import Any


class Probe:
    """Called at fixed points of a worker's work; every method here does nothing."""

    def after_output(self, request_id: str, num_output_tokens: int) -> None:
        """Decode, on its loop thread: ``request_id``'s chunk with its first
        ``num_output_tokens`` tokens has just been sent."""

    def after_layer(self, request_id: str, layer: int) -> None:
        """Prefill, on each rank: ``layer``'s KV of ``request_id`` has just been posted."""

    def drop_notice(self, request_id: str) -> bool:
        """Prefill, on each rank's KV progress thread: True loses ``request_id``'s DONE notice
        on the way to decode (the writes all landed; decode never hears of it)."""
        return False

    def before_kv_verify(self, request_id: str, tp_rank: int, wire_data: Any,
                         landed_blocks: list[int]) -> None:
        """Decode, on each rank, with ``kv_transfer_checksum`` on: ``request_id``'s remote KV
        has landed and is about to be checked. ``wire_data`` is the rank's wire region
        (a tensor ``[layers, 2, blocks, heads, block_size, head_dim]``: the pool, or the fp8
        staging area), ``landed_blocks`` the blocks of it that were written."""
