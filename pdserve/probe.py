"""A seam for tests: where a worker may be watched or paused, and a default that does nothing.

The cluster hands one ``Probe`` to every worker it starts (``cluster.launch(config,
probe=...)``). Production passes none and gets this class, whose methods return at once; a
test passes a subclass that, say, blocks the decode loop after a chosen request's second token
until the test releases it.
"""

from __future__ import annotations


class Probe:
    """Called at fixed points of a worker's work; every method here does nothing."""

    def after_output(self, request_id: str, num_output_tokens: int) -> None:
        """Decode, on its loop thread: ``request_id``'s chunk with its first
        ``num_output_tokens`` tokens has just been sent."""

    def after_layer(self, request_id: str, layer: int) -> None:
        """Prefill, on each rank: ``layer``'s KV of ``request_id`` has just been posted."""
