"""Per-request sampling parameters: validated once where a request enters (the router's HTTP
edge, the cluster facade, the offline engine) and carried typed from there to the sampler.

``SamplingParams`` is a frozen msgspec Struct, so a ``Generate`` message carries it as it is,
and decoding one off the wire runs the same checks (msgspec turns the ``ValueError`` into a
validation error naming the field).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_STOP_TOKEN_IDS = 1024


class SamplingError(ValueError):
    """A sampling parameter is out of range; ``field`` names it (the HTTP edge's ``param``)."""

    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(f"{field}={value!r} is invalid: must be {expected}")
        self.field = field


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy. ``top_k`` of -1 or 0 and ``top_p == 1`` disable those
    filters. A ``seed`` makes one request's sampling reproducible whatever it is batched with.
    ``max_tokens=None`` generates until a stop or the end of the context. ``output_logits``
    keeps the float32 logits of every sampled step (tests compare them). ``output_offset``
    is how many output tokens the request had before this run of it: a request the router
    migrates to another decode worker is replayed from its prompt plus those tokens, and a
    seeded one samples token ``i`` from ``(seed, output_offset + i)`` (engine/sampler.py), as
    it would have on the first worker.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    output_logits: bool = False
    output_offset: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not (_is_int(self.max_tokens)
                                                and 1 <= self.max_tokens <= MAX_INT32):
            raise SamplingError("max_tokens", self.max_tokens,
                                f"an integer in [1, {MAX_INT32}] or None")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise SamplingError("temperature", self.temperature, "a finite number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError("top_p", self.top_p, "in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_INT32:
            raise SamplingError("top_k", self.top_k, "-1 or 0 (off) or an integer >= 1")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise SamplingError("seed", self.seed, f"an integer in [0, {MAX_SEED}] or None")
        ids = self.stop_token_ids
        if (not isinstance(ids, (tuple, list)) or len(ids) > MAX_STOP_TOKEN_IDS
                or not all(_is_int(t) and 0 <= t <= MAX_INT32 for t in ids)):
            raise SamplingError("stop_token_ids", ids,
                                f"at most {MAX_STOP_TOKEN_IDS} token ids in [0, {MAX_INT32}]")
        if not (_is_int(self.output_offset) and 0 <= self.output_offset <= MAX_INT32):
            raise SamplingError("output_offset", self.output_offset,
                                f"an integer in [0, {MAX_INT32}]")
        for name in ("ignore_eos", "output_logits"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(name, getattr(self, name), "true or false")
        msgspec.structs.force_setattr(self, "stop_token_ids", tuple(ids))
        msgspec.structs.force_setattr(self, "temperature", float(self.temperature))
        msgspec.structs.force_setattr(self, "top_p", float(self.top_p))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def with_max_tokens(self, max_tokens: int) -> SamplingParams:
        """The same parameters with ``max_tokens`` resolved (e.g. to the room left)."""
        return msgspec.structs.replace(self, max_tokens=max_tokens)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if _is_int(value):
        return abs(value) <= MAX_SEED  # a 400-digit int is no float: math.isfinite overflows
    return isinstance(value, float) and math.isfinite(value)
