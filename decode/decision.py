"""Where a request's prefill runs: on this decode worker, or on a prefill worker.

Pure Python, so every rule is unit-tested exactly. Remote pays only when there is enough
uncached prompt to outweigh moving its KV, and only while a prefill worker can take it.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum
from typing import NamedTuple

from pdserve.choices import DisaggMode


class Where(Enum):
    """Where a request's prefill runs: on this decode worker or on a prefill worker."""

    LOCAL = "local"
    REMOTE = "remote"


class Reason(Enum):
    """The rule that decided; its value labels the decision counts in the worker stats."""

    MODE_NEVER = "mode_never"
    MODE_ALWAYS = "mode_always"
    SHORT_UNCACHED = "short_uncached"  # uncached_tokens <= max_local_prefill_tokens
    NOTHING_TO_SEND = "nothing_to_send"  # every block but the last token's is cached
    NO_PREFILL_WORKER = "no_prefill_worker"
    PREFILL_QUEUE_FULL = "prefill_queue_full"
    RESERVATION_CAP = "reservation_cap"  # remote reservations hold max_remote_reserved_blocks
    LONG_UNCACHED = "long_uncached"


class Decision(NamedTuple):
    """Where a prefill runs and the rule that chose it."""

    where: Where
    reason: Reason


class DecisionPolicy:
    """A ``DisaggMode``, with the thresholds of DESIGN.md step 3."""

    def __init__(self, mode: DisaggMode, max_local_prefill_tokens: int, max_prefill_queue: int,
                 max_remote_reserved_blocks: int | None):
        if not isinstance(mode, DisaggMode):  # a string would compare unequal to every mode
            raise ValueError(f"disagg_mode: {mode!r} is invalid, must be a DisaggMode "
                             f"(DecodeConfig turns the config's string into one)")
        self.mode = mode
        self.max_local_prefill_tokens = max_local_prefill_tokens
        self.max_prefill_queue = max_prefill_queue
        self.max_remote_reserved_blocks = max_remote_reserved_blocks
        self.counts: Counter[tuple[str, str]] = Counter()

    def decide(self, uncached_tokens: int, num_blocks_to_send: int, prefill_queue: int | None,
               num_reserved_blocks: int) -> Decision:
        """``prefill_queue`` is the shortest healthy prefill queue (None: none healthy);
        ``num_reserved_blocks`` the blocks remote prefills hold now."""
        decision = self._decide(uncached_tokens, num_blocks_to_send, prefill_queue,
                                num_reserved_blocks)
        self.counts[decision.where.value, decision.reason.value] += 1
        return decision

    def _decide(self, uncached_tokens: int, num_blocks_to_send: int,
                prefill_queue: int | None, num_reserved_blocks: int) -> Decision:
        if self.mode is DisaggMode.NEVER:
            return Decision(Where.LOCAL, Reason.MODE_NEVER)
        if num_blocks_to_send == 0:
            return Decision(Where.LOCAL, Reason.NOTHING_TO_SEND)
        if prefill_queue is None:
            return Decision(Where.LOCAL, Reason.NO_PREFILL_WORKER)
        if self.mode is DisaggMode.ALWAYS:
            return Decision(Where.REMOTE, Reason.MODE_ALWAYS)
        if uncached_tokens <= self.max_local_prefill_tokens:
            return Decision(Where.LOCAL, Reason.SHORT_UNCACHED)
        if prefill_queue > self.max_prefill_queue:
            return Decision(Where.LOCAL, Reason.PREFILL_QUEUE_FULL)
        cap = self.max_remote_reserved_blocks
        if cap is not None and num_reserved_blocks + num_blocks_to_send > cap:
            return Decision(Where.LOCAL, Reason.RESERVATION_CAP)
        return Decision(Where.REMOTE, Reason.LONG_UNCACHED)
