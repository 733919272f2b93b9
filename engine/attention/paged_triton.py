"""The CUDA backend: a Triton kernel that reads KV blocks in place through block tables.

One program per (query token, KV head) walks the token's block table with a running softmax,
for the query heads that share the KV head; float32, bfloat16 and fp8 pools (fp8 is read as
bytes and widened in the kernel, then scaled per token). A chunk with nothing cached before
it (in a lossless pool) attends over its own K/V with SDPA, as on the CPU.

The plan is plain tensors of fixed meaning (per query row: visible keys and table row; 0
visible keys skips the row), so a decode batch padded to a bucket size runs the same kernel
under a CUDA graph. Tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``,
tests/unit/test_triton_attention.py) where triton is installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from engine.attention.base import SequenceSpan, fresh_causal
from engine.kv_cache import KVCache

HAS_TRITON = importlib.util.find_spec("triton") is not None

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 1}


def unavailable(cache: KVCache, num_heads: int) -> str | None:
    """Why the Triton kernel cannot serve this pool, or None if it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    _, _, _, num_kv_heads, block_size, head_dim = cache.data.shape
    for name, value in (("head_dim", head_dim), ("block_size", block_size)):
        if value & (value - 1) or value < 4:
            return f"{name}={value} (the Triton kernel takes powers of two >= 4)"
    if not cache.is_fp8 and cache.data.dtype not in _DTYPE_CODES:
        return f"pool dtype {cache.data.dtype}"
    return None


@dataclass(slots=True)
class TritonPlan:
    """Per query row: keys it sees (0: not this kernel's row) and its block-table row."""

    visible: torch.Tensor  # [T] int32
    table_rows: torch.Tensor  # [T] int32
    tables: torch.Tensor  # [I, width] int32
    fresh: list[slice]


class PagedTritonBackend:
    """Reads KV in place with a Triton kernel (see the module docstring)."""

    name = "paged-triton"

    def __init__(self, cache: KVCache, num_heads: int, device: torch.device):
        reason = unavailable(cache, num_heads)
        if reason is not None:
            raise ValueError(f"the Triton attention kernel does not take {reason}")
        self.cache = cache
        self.device = device
        self.num_heads = num_heads
        _, _, _, self.num_kv_heads, self.block_size, self.head_dim = cache.data.shape
        self.group = num_heads // self.num_kv_heads
        from engine.attention import triton_kernels

        self.kernel = triton_kernels.paged_attention
        self.group_pad = max(triton_kernels.triton.next_power_of_2(self.group), 1)

    def plan(self, spans: list[SequenceSpan]) -> TritonPlan:
        rows = sum(s.num_tokens for s in spans)
        visible, table_rows, tables, fresh = [0] * rows, [0] * rows, [], []
        for span in spans:
            if span.start == 0 and span.num_tokens > 1 and not self.cache.is_fp8:
                fresh.append(slice(span.row, span.row + span.num_tokens))
                continue
            for index in range(span.num_tokens):
                visible[span.row + index] = span.start + index + 1
                table_rows[span.row + index] = len(tables)
            tables.append(span.block_ids)
        width = max((len(t) for t in tables), default=1)
        padded = [t + [0] * (width - len(t)) for t in tables] or [[0]]
        return TritonPlan(self._tensor(visible), self._tensor(table_rows), self._tensor(padded),
                          fresh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
               layer: int, plan: TritonPlan, scale: float) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty_like(q)
        data = cache.data[layer]
        keys, values = (data[0].view(torch.uint8), data[1].view(torch.uint8)) if cache.is_fp8 \
            else (data[0], data[1])
        scales = cache.scales[layer] if cache.is_fp8 else None
        grid = (q.shape[0], self.num_kv_heads)
        self.kernel[grid](
            q, out, keys, values, scales[0] if scales is not None else keys,
            scales[1] if scales is not None else values, plan.tables, plan.tables.shape[1],
            plan.visible, plan.table_rows, scale, self.num_heads,
            NUM_KV_HEADS=self.num_kv_heads, GROUP=self.group,
            GROUP_PAD=self.group_pad, BLOCK_SIZE=self.block_size,
            HEAD_DIM=self.head_dim, IS_FP8=cache.is_fp8)
        for rows in plan.fresh:
            out[rows] = fresh_causal(q, k, v, rows, scale)
        return out

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)
