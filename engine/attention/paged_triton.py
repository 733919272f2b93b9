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

from dataclasses import dataclass

import torch

from engine.attention.base import SequenceSpan, fresh_causal
from engine.kv_cache import KVCache

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the CUDA backend is unavailable, the reference serves
    triton = None

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 1}


def unavailable(cache: KVCache, num_heads: int) -> str | None:
    """Why the Triton kernel cannot serve this pool, or None if it can."""
    if triton is None:
        return "triton is not installed"
    _, _, _, num_kv_heads, block_size, head_dim = cache.data.shape
    for name, value in (("head_dim", head_dim), ("block_size", block_size)):
        if value & (value - 1) or value < 4:
            return f"{name}={value} (the Triton kernel takes powers of two >= 4)"
    if not cache.is_fp8 and cache.data.dtype not in _DTYPE_CODES:
        return f"pool dtype {cache.data.dtype}"
    return None


if triton is not None:

    @triton.jit
    def _fp8_e4m3_to_float(byte):
        # Normal: exponent and mantissa moved into place with the bias raised by 120;
        # subnormal: mantissa * 2^-9. The pool never holds NaN (quantization clamps).
        magnitude = (byte & 0x7F).to(tl.int32)
        normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
        value = tl.where((magnitude >> 3) > 0, normal, magnitude.to(tl.float32) * 0.001953125)
        return tl.where((byte & 0x80) > 0, -value, value)

    @triton.jit
    def _paged_attention(q_ptr, out_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, tables_ptr,
                         table_stride, visible_ptr, table_row_ptr, scale, num_heads,
                         NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, IS_FP8: tl.constexpr):
        token = tl.program_id(0)
        kv_head = tl.program_id(1)
        visible = tl.load(visible_ptr + token)
        if visible > 0:
            table = tables_ptr + tl.load(table_row_ptr + token) * table_stride
            heads = tl.arange(0, GROUP_PAD)
            dims = tl.arange(0, HEAD_DIM)
            slots = tl.arange(0, BLOCK_SIZE)
            head_ok = heads < GROUP
            q_rows = (token * num_heads + kv_head * GROUP + heads) * HEAD_DIM
            q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=head_ok[:, None],
                        other=0.0).to(tl.float32) * scale  # [G, D]
            row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            row_sum = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
            for b in range(0, tl.cdiv(visible, BLOCK_SIZE)):
                block = tl.load(table + b).to(tl.int64)
                key_ok = b * BLOCK_SIZE + slots < visible
                rows = (block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + slots  # [bs]
                offsets = rows[:, None] * HEAD_DIM + dims[None, :]
                if IS_FP8:
                    k = _fp8_e4m3_to_float(tl.load(k_ptr + offsets, mask=key_ok[:, None],
                                                   other=0))
                    v = _fp8_e4m3_to_float(tl.load(v_ptr + offsets, mask=key_ok[:, None],
                                                   other=0))
                    k = k * tl.load(k_scale_ptr + rows, mask=key_ok, other=0.0)[:, None]
                    v = v * tl.load(v_scale_ptr + rows, mask=key_ok, other=0.0)[:, None]
                else:
                    k = tl.load(k_ptr + offsets, mask=key_ok[:, None], other=0.0).to(tl.float32)
                    v = tl.load(v_ptr + offsets, mask=key_ok[:, None], other=0.0).to(tl.float32)
                scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, bs]
                scores = tl.where(key_ok[None, :], scores, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(scores, axis=1))
                weights = tl.exp(scores - new_max[:, None])
                correction = tl.exp(row_max - new_max)
                row_sum = row_sum * correction + tl.sum(weights, axis=1)
                acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * v[None, :, :],
                                                         axis=1)
                row_max = new_max
            result = acc / row_sum[:, None]
            tl.store(out_ptr + q_rows[:, None] + dims[None, :],
                     result.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


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
        _paged_attention[grid](
            q, out, keys, values, scales[0] if scales is not None else keys,
            scales[1] if scales is not None else values, plan.tables, plan.tables.shape[1],
            plan.visible, plan.table_rows, scale, self.num_heads,
            NUM_KV_HEADS=self.num_kv_heads, GROUP=self.group,
            GROUP_PAD=max(triton.next_power_of_2(self.group), 1), BLOCK_SIZE=self.block_size,
            HEAD_DIM=self.head_dim, IS_FP8=cache.is_fp8)
        for rows in plan.fresh:
            out[rows] = fresh_causal(q, k, v, rows, scale)
        return out

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)
