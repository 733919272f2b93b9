"""The paged KV pool: allocated once, never moved (NIXL registers its addresses).

Layout, per layer, K and V each ``[num_blocks, num_kv_heads_local, block_size, head_dim]``:
heads before tokens, so one head range of one block is contiguous. With ``fp8`` the data is
``float8_e4m3fn`` and a float32 scale per token per head sits beside it in
``[num_blocks, num_kv_heads_local, block_size]``. All layers live in one tensor so the pool
is a single registration.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Floor on a scale so an all-zero row does not divide by zero.
_MIN_SCALE = 1e-12


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) dynamic fp8: ``x ≈ q.float() * scale[..., None]``."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


# Every fp8 value as float32, indexed by its bit pattern. On CPU, looking values up was faster
# than torch's element-wise fp8 -> float conversion in a one-off timing (no committed
# benchmark isolates it), and gives the same floats.
_FP8_TO_FLOAT32 = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if q.device.type == "cpu":
        values = _FP8_TO_FLOAT32[q.view(torch.uint8).int()]
    else:
        values = q.float()
    return values.mul_(scale.unsqueeze(-1)).to(dtype)


def bytes_per_block(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int,
                    dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """What one block costs across all layers, K and V, scales included: pool sizing."""
    if kv_cache_dtype == "fp8":
        per_token_head = head_dim * FP8_DTYPE.itemsize + torch.float32.itemsize
    else:
        per_token_head = head_dim * dtype.itemsize
    return num_layers * 2 * num_kv_heads * block_size * per_token_head


class PoolRows(NamedTuple):
    """Flat pool-row indices for a batch of block tables (see ``KVCache.rows_for``)."""

    rows: torch.Tensor  # [B * kv_heads * nb]
    batch: int
    num_table_blocks: int


_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20


def _zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """A zeroed tensor; in CPU memory, backed by transparent huge pages where the kernel
    offers them: attention reads the pool in block-sized pieces scattered over all of it,
    and 4 KiB pages would cost a TLB miss on most of them."""
    pool = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu" and pool.nbytes >= _HUGE_PAGE:
        libc = ctypes.CDLL(None, use_errno=True)
        first = -(-pool.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        length = (pool.data_ptr() + pool.nbytes - first) // _HUGE_PAGE * _HUGE_PAGE
        if length > 0:  # advice only: without huge pages the pool works the same
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    return pool.zero_()


class KVCache:
    """K and V blocks for every layer of one tensor-parallel rank."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype: torch.dtype, kv_cache_dtype: str,
                 device: torch.device | str):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.is_fp8 = kv_cache_dtype == "fp8"
        storage = FP8_DTYPE if self.is_fp8 else dtype
        # zeros, not empty: a decode reads whole blocks and masks the unused slots, and a
        # masked NaN left over in uninitialised memory would still poison the softmax sum.
        # [num_layers, 2 (K, V), num_blocks, kv_heads, block_size, head_dim]
        self.data = _zeroed_pool((num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim),
                                 storage, torch.device(device))
        # [num_layers, 2, num_blocks, kv_heads, block_size]
        self.scales = (torch.ones(num_layers, 2, num_blocks, num_kv_heads, block_size,
                                  dtype=torch.float32, device=device) if self.is_fp8 else None)

    def write(self, layer: int, block_ids: torch.Tensor, offsets: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K and V (``[T, kv_heads, head_dim]``) at (block, offset)."""
        for index, x in enumerate((k, v)):
            if self.is_fp8:
                q, scale = quantize_fp8(x)
                self.data[layer, index, block_ids, :, offsets] = q
                self.scales[layer, index, block_ids, :, offsets] = scale
            else:
                self.data[layer, index, block_ids, :, offsets] = x

    def rows_for(self, block_tables: torch.Tensor) -> PoolRows:
        """The pool rows holding ``block_tables`` ``[B, nb]``, ordered (request, head, block).

        One (block, head) pair is a contiguous ``[bs, D]`` row of the pool, so gathering
        these rows lands K and V already in attention layout: no permute copy afterwards.
        Built once per step and used by every layer.
        """
        batch, num_table_blocks = block_tables.shape
        heads = self.data.shape[3]
        head_ids = torch.arange(heads, device=block_tables.device)
        rows = (block_tables[:, None, :] * heads + head_ids[None, :, None]).flatten()
        return PoolRows(rows, batch, num_table_blocks)

    def gather(self, layer: int, rows: PoolRows) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks as ``[B, kv_heads, nb*bs, D]``."""
        _, _, num_blocks, heads, block_size, head_dim = self.data.shape
        out = []
        for index in range(2):
            pool = self.data[layer, index].view(num_blocks * heads, block_size * head_dim)
            x = pool.index_select(0, rows.rows)
            if self.is_fp8:
                scales = self.scales[layer, index].view(num_blocks * heads, block_size)
                x = dequantize_fp8(x.view(-1, block_size, head_dim),
                                   scales.index_select(0, rows.rows), self.dtype)
            out.append(x.view(rows.batch, heads, rows.num_table_blocks * block_size, head_dim))
        return out[0], out[1]
