"""The reference backend: gather each request's blocks into a contiguous copy, then SDPA.

Simple and obviously right, so the tests hold the fast backends to it. Decodes (one query
token each) attend in batched calls over their gathered blocks, in groups of similar length
(the runner sorts decodes by context length, so little is gathered for padding); each prefill
chunk attends causally over its cached prefix plus itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import SequenceSpan, fresh_causal
from engine.kv_cache import KVCache, PoolRows

# Decodes attend in groups this large: large enough to batch the kernels, small enough that
# sorting by length leaves little padding to gather.
DECODE_GROUP_SIZE = 16


@dataclass(slots=True)
class DecodeGroup:
    """Decodes at batch rows ``[row, row + B)``, one query token each."""

    row: int
    blocks: PoolRows  # B tables of nb blocks, padded with block 0
    context_lens: torch.Tensor  # [B]


@dataclass(slots=True)
class PrefillChunk:
    """A span of several queries and the pool rows of its one table."""

    span: SequenceSpan
    blocks: PoolRows


@dataclass(slots=True)
class ReferencePlan:
    """A step's decode groups and prefill chunks, with the pool rows each gathers."""

    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]


class ReferenceBackend:
    """Gather, then ``scaled_dot_product_attention``; any device, any pool dtype."""

    name = "reference"

    def __init__(self, cache: KVCache, device: torch.device):
        self.cache = cache
        self.device = device

    def plan(self, spans: list[SequenceSpan]) -> ReferencePlan:
        decodes = [s for s in spans if s.num_tokens == 1]
        groups = []
        for first in range(0, len(decodes), DECODE_GROUP_SIZE):
            group = decodes[first : first + DECODE_GROUP_SIZE]
            if any(s.row != group[0].row + i for i, s in enumerate(group)):
                raise ValueError("reference attention needs a group's decodes on adjacent rows")
            width = max(len(s.block_ids) for s in group)
            tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in group]
            groups.append(DecodeGroup(
                group[0].row, self.cache.rows_for(self._tensor(tables)),
                self._tensor([s.context_len for s in group])))
        prefills = [PrefillChunk(s, self.cache.rows_for(self._tensor([s.block_ids])))
                    for s in spans if s.num_tokens > 1]
        return ReferencePlan(groups, prefills)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
               layer: int, plan: ReferencePlan, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for group in plan.decodes:
            keys, values = cache.gather(layer, group.blocks)  # [B, Hkv, L, D]
            batch, num_kv_heads, length, head_dim = keys.shape
            positions = torch.arange(length, device=q.device)
            mask = positions[None, :] < group.context_lens[:, None]  # [B, L]
            rows = slice(group.row, group.row + batch)
            # Grouped-query decode without repeating K/V: the query heads sharing a KV head
            # stand in as that head's query rows. [B, Hkv, Hq/Hkv, D]
            query = q[rows].view(batch, num_kv_heads, -1, head_dim)
            result = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
            out[rows] = result.reshape(batch, -1, head_dim)
        for chunk in plan.prefills:
            span = chunk.span
            rows = slice(span.row, span.row + span.num_tokens)
            if span.start == 0 and not cache.is_fp8:
                out[rows] = fresh_causal(q, k, v, rows, scale)
                continue
            context_len = span.context_len
            keys, values = cache.gather(layer, chunk.blocks)
            keys, values = keys[:, :, :context_len], values[:, :, :context_len]
            query = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            query_pos = torch.arange(span.start, context_len, device=q.device)
            key_pos = torch.arange(context_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [n, L] causal with an offset
            result = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
            out[rows] = result.squeeze(0).transpose(0, 1)
        return out

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
