"""What every attention backend shares: a step's spans, its metadata, the backend interface.

A batch is flat: ``T`` tokens from several requests. Each request's tokens in it are one
``SequenceSpan``: queries at consecutive batch rows and positions, with the block table that
covers every position up to its last query. Every token's K and V is written to the pool
first; the backend then computes causal attention for each span over the pool (its cached
prefix plus itself). The runner builds the spans in plain Python; ``backend.plan`` turns them
into whatever tensors the backend wants, once per step, and every layer reuses that plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache


@dataclass(slots=True)
class SequenceSpan:
    """``num_tokens`` queries at batch rows ``[row, row + num_tokens)`` and positions
    ``[start, start + num_tokens)``; ``block_ids`` cover positions ``[0, start + num_tokens)``."""

    row: int
    start: int
    num_tokens: int
    block_ids: list[int]

    @property
    def context_len(self) -> int:
        return self.start + self.num_tokens


class AttentionBackend(Protocol):
    """Causal attention of a flat batch over the paged pool, after the batch's K/V is written.

    ``plan`` runs once per step; ``attend`` once per layer with that plan and returns
    ``[T, Hq, D]`` for q ``[T, Hq, D]``. k/v ``[T, Hkv, D]`` are the batch's own keys and values
    (already in the pool; a backend may read them from here where that is cheaper).
    """

    name: str

    def plan(self, spans: list[SequenceSpan]) -> Any: ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
               layer: int, plan: Any, scale: float) -> torch.Tensor: ...


@dataclass(slots=True)
class AttentionMetadata:
    """How a flat batch of ``T`` tokens uses the pool: where each token's K/V is written
    (block, slot in it), and the backend's plan for attending over it."""

    write_block_ids: torch.Tensor  # [T]
    write_offsets: torch.Tensor  # [T]
    backend: AttentionBackend
    plan: Any


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                    layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``; k/v are stored in ``cache``."""
    cache.write(layer, meta.write_block_ids, meta.write_offsets, k, v)
    return meta.backend.attend(q, k, v, cache, layer, meta.plan, scale)


def fresh_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice,
                 scale: float) -> torch.Tensor:
    """A chunk with nothing cached before it, over its own K/V: ``[n, Hq, D]``."""
    query = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    keys = k[rows].transpose(0, 1).unsqueeze(0)
    values = v[rows].transpose(0, 1).unsqueeze(0)
    result = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                            enable_gqa=True)
    return result.squeeze(0).transpose(0, 1)
