"""Attention over paged KV blocks, in plain PyTorch.

A batch is flat: ``T`` tokens from several requests, decodes (one query token each) first,
sorted by context length, then prefill chunks. Every token's K and V is written to the pool
first; decodes then attend over their gathered blocks in a few batched calls (groups of
similar length, so little is gathered for padding), and each prefill chunk attends causally
over its cached prefix plus itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache, PoolRows


@dataclass(slots=True)
class PrefillChunk:
    """``num_tokens`` queries at batch rows ``[row, row + num_tokens)``, positions from
    ``start``; ``blocks`` (one table) cover positions ``[0, start + num_tokens)``."""

    row: int
    start: int
    num_tokens: int
    blocks: PoolRows


@dataclass(slots=True)
class DecodeGroup:
    """Decodes at batch rows ``[row, row + B)``, one query token each."""

    row: int
    blocks: PoolRows  # B tables of nb blocks, padded with block 0
    context_lens: torch.Tensor  # [B]


@dataclass(slots=True)
class AttentionMetadata:
    """How a flat batch of ``T`` tokens uses the pool: where each token's K/V is written
    (block, offset in it), then what its decode groups and prefill chunks attend over."""

    write_block_ids: torch.Tensor  # [T] block of each token's KV
    write_offsets: torch.Tensor  # [T] slot within that block
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                    layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``; k/v are stored in ``cache``."""
    cache.write(layer, meta.write_block_ids, meta.write_offsets, k, v)
    out = torch.empty_like(q)
    for group in meta.decodes:
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
    for chunk in meta.prefills:
        rows = slice(chunk.row, chunk.row + chunk.num_tokens)
        query = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if chunk.start == 0 and not cache.is_fp8:
            # Nothing cached before the chunk: attend over the fresh K/V, no gather needed.
            keys = k[rows].transpose(0, 1).unsqueeze(0)
            values = v[rows].transpose(0, 1).unsqueeze(0)
            result = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            context_len = chunk.start + chunk.num_tokens
            keys, values = cache.gather(layer, chunk.blocks)
            keys, values = keys[:, :, :context_len], values[:, :, :context_len]
            query_pos = torch.arange(chunk.start, context_len, device=q.device)
            key_pos = torch.arange(context_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [n, L] causal with an offset
            result = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = result.squeeze(0).transpose(0, 1)
    return out
