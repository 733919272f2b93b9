"""The CPU backend: a C++ kernel that reads KV blocks in place through block tables.

No per-step copy of a request's KV: each (sequence, KV head, query tile) walks its block
table and keeps a running softmax (flash attention's online rescaling) while it reads each
block once. It serves decodes and chunks after a cached prefix, in float32, bfloat16 and fp8
pools; a chunk with nothing cached before it (in a lossless pool) attends over its own fresh
K/V with SDPA, which turns that into GEMMs.

The kernel is ``engine/cpu_kernels/paged_attention.cpp``, built on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import SequenceSpan, fresh_causal
from engine.cpu_kernels import KernelUnavailable, load
from engine.kv_cache import KVCache

MAX_HEAD_DIM, MAX_BLOCK_SIZE, MAX_GROUP = 256, 64, 16
_KV_TYPES = {torch.float32: 0, torch.bfloat16: 1}
_KV_FP8 = 2
_Q_TYPES = {torch.float32: 0, torch.bfloat16: 1}


_ERRORS = {1: f"head_dim above {MAX_HEAD_DIM}", 2: f"block_size above {MAX_BLOCK_SIZE}",
           3: "num_heads not a multiple of num_kv_heads",
           4: f"more than {MAX_GROUP} query heads per KV head"}


def supports(cache: KVCache, num_heads: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot serve this pool and model, or None if it can."""
    _, _, _, num_kv_heads, block_size, head_dim = cache.data.shape
    if cache.data.device.type != "cpu":
        return "the pool is not in CPU memory"
    if dtype not in _Q_TYPES:
        return f"dtype {dtype} (the kernel takes float32 and bfloat16)"
    if not cache.is_fp8 and cache.data.dtype not in _KV_TYPES:
        return f"pool dtype {cache.data.dtype}"
    if head_dim > MAX_HEAD_DIM:
        return _ERRORS[1]
    if block_size > MAX_BLOCK_SIZE:
        return _ERRORS[2]
    if num_heads // num_kv_heads > MAX_GROUP:
        return _ERRORS[4]
    return None


@dataclass(slots=True)
class PagedPlan:
    """The kernel's work items and tables, plus the chunks SDPA runs on fresh K/V."""

    items: torch.Tensor  # [I, 4] int64: q_row, num_queries, start, table row
    tables: torch.Tensor  # [I, width] int32, padded with block 0
    fresh: list[slice]  # rows of chunks with nothing cached before them


class PagedCPUBackend:
    """Reads KV in place on the CPU (see the module docstring)."""

    name = "paged-cpu"

    def __init__(self, cache: KVCache, num_heads: int, dtype: torch.dtype):
        reason = supports(cache, num_heads, dtype)
        if reason is not None:
            raise KernelUnavailable(f"the CPU attention kernel does not take {reason}")
        self.function = load().pdserve_paged_attention
        self.cache = cache
        self.num_heads = num_heads
        self.kv_type = _KV_FP8 if cache.is_fp8 else _KV_TYPES[cache.data.dtype]
        self.q_type = _Q_TYPES[dtype]
        _, _, _, self.num_kv_heads, self.block_size, self.head_dim = cache.data.shape

    def plan(self, spans: list[SequenceSpan]) -> PagedPlan:
        in_pool, fresh = [], []
        for span in spans:
            if span.start == 0 and span.num_tokens > 1 and not self.cache.is_fp8:
                fresh.append(slice(span.row, span.row + span.num_tokens))
            else:
                in_pool.append(span)
        width = max((len(s.block_ids) for s in in_pool), default=1)
        tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in in_pool] or [[0]]
        items = [[s.row, s.num_tokens, s.start, i] for i, s in enumerate(in_pool)]
        return PagedPlan(torch.tensor(items, dtype=torch.int64).reshape(-1, 4),
                         torch.tensor(tables, dtype=torch.int32), fresh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
               layer: int, plan: PagedPlan, scale: float) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty_like(q)
        if len(plan.items):
            scales = cache.scales
            code = self.function(
                self.kv_type, self.q_type, q.data_ptr(), out.data_ptr(),
                cache.data[layer, 0].data_ptr(), cache.data[layer, 1].data_ptr(),
                scales[layer, 0].data_ptr() if scales is not None else None,
                scales[layer, 1].data_ptr() if scales is not None else None,
                plan.tables.data_ptr(), plan.tables.shape[1],
                plan.items.data_ptr(), len(plan.items), self.num_heads, self.num_kv_heads,
                self.block_size, self.head_dim, scale, torch.get_num_threads())
            if code:
                raise RuntimeError(f"CPU attention kernel refused the batch: {_ERRORS[code]}")
        for rows in plan.fresh:
            out[rows] = fresh_causal(q, k, v, rows, scale)
        return out
