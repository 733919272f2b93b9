"""The paged CPU attention kernel against the reference backend (gather + SDPA).

Pools hold random K/V in shuffled physical blocks; batches mix decodes, chunks after a cached
prefix and fresh chunks, with partial last blocks, over MHA and GQA head groupings, head dims
on the vector path and off it, float32, bfloat16 and fp8 pools, one thread and two.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import make_backend
from engine.attention.base import SequenceSpan
from engine.attention.paged_cpu import PagedCPUBackend
from engine.attention.reference import ReferenceBackend
from engine.kv_cache import FP8_DTYPE, KVCache, quantize_fp8

CPU = torch.device("cpu")


def filled_pool(num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                dtype: torch.dtype, kv_cache_dtype: str, seed: int) -> KVCache:
    cache = KVCache(2, num_blocks, num_kv_heads, block_size, head_dim, dtype, kv_cache_dtype,
                    CPU)
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(cache.data.shape, generator=generator)
    if cache.is_fp8:
        cache.data[:], cache.scales[:] = quantize_fp8(values)
    else:
        cache.data[:] = values.to(dtype)
    return cache


def spans_for(lengths: list[tuple[int, int]], block_size: int, num_blocks: int,
              seed: int) -> list[SequenceSpan]:
    """(context length, queries) per sequence, decodes first as the runner orders them;
    block ids drawn without replacement from a shuffled pool (block 0 left out)."""
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1)
    spans, row, used = [], 0, 0
    for context, queries in sorted(lengths, key=lambda item: (item[1] != 1, item[0])):
        blocks = -(-context // block_size)
        spans.append(SequenceSpan(row, context - queries, queries,
                                  order[used : used + blocks].tolist()))
        row, used = row + queries, used + blocks
    return spans


def attend_both(cache: KVCache, spans: list[SequenceSpan], num_heads: int, dtype: torch.dtype,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, _, num_kv_heads, _, head_dim = cache.data.shape
    rows = sum(s.num_tokens for s in spans)
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, num_heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(rows, num_kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(rows, num_kv_heads, head_dim, generator=generator).to(dtype)
    # The pool holds what the batch wrote: attention over a fresh chunk reads k/v directly.
    for span in spans:
        for index in range(span.num_tokens):
            position = span.start + index
            block = span.block_ids[position // cache.block_size]
            cache.write(1, torch.tensor([block]), torch.tensor([position % cache.block_size]),
                        k[span.row + index : span.row + index + 1],
                        v[span.row + index : span.row + index + 1])
    scale = head_dim**-0.5
    paged = PagedCPUBackend(cache, num_heads, dtype)
    reference = ReferenceBackend(cache, CPU)
    got = paged.attend(q, k, v, cache, 1, paged.plan(spans), scale)
    want = reference.attend(q.float() if dtype == torch.bfloat16 else q,
                            k.float() if dtype == torch.bfloat16 else k,
                            v.float() if dtype == torch.bfloat16 else v,
                            _as_float(cache), 1, reference.plan(spans), scale)
    return got.float(), want.float()


def _as_float(cache: KVCache) -> KVCache:
    """A float32 copy of a bf16 pool, so the reference computes at full precision."""
    if cache.data.dtype != torch.bfloat16:
        return cache
    _, _, num_blocks, heads, block_size, head_dim = cache.data.shape
    copy = KVCache(cache.data.shape[0], num_blocks, heads, block_size, head_dim,
                   torch.float32, "auto", CPU)
    copy.data[:] = cache.data.float()
    return copy


MIXED = [(1, 1), (5, 1), (16, 1), (17, 1), (70, 1), (33, 9), (64, 20), (19, 19), (40, 40)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1), (16, 2)])
@pytest.mark.parametrize("head_dim", [16, 64, 24])
def test_matches_reference_across_head_layouts(num_heads, num_kv_heads, head_dim):
    cache = filled_pool(64, num_kv_heads, 8, head_dim, torch.float32, "auto", seed=1)
    spans = spans_for(MIXED, 8, 64, seed=2)
    got, want = attend_both(cache, spans, num_heads, torch.float32, seed=3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_matches_reference_across_block_sizes(block_size):
    num_blocks = 300 // block_size + 40
    cache = filled_pool(num_blocks, 2, block_size, 32, torch.float32, "auto", seed=4)
    spans = spans_for([(1, 1), (3, 1), (65, 1), (130, 1), (90, 30), (50, 50)], block_size,
                      num_blocks, seed=5)
    got, want = attend_both(cache, spans, 4, torch.float32, seed=6)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_fp8_pool_matches_reference():
    cache = filled_pool(64, 2, 8, 64, torch.float32, "fp8", seed=7)
    spans = spans_for(MIXED, 8, 64, seed=8)
    got, want = attend_both(cache, spans, 8, torch.float32, seed=9)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_fp8_pool_decodes_every_bit_pattern():
    """Every e4m3 value but NaN (0x7f, 0xff), subnormals included, reads as torch converts it:
    token t's values hold pattern t, and a query that matches only token t's key puts all
    the weight (to within e^-100) on it."""
    patterns = [b for b in range(256) if b not in (0x7F, 0xFF)]
    block_size, head_dim = 2, 16
    blocks = list(range(1, 1 + len(patterns) // block_size))
    cache = KVCache(1, blocks[-1] + 1, 1, block_size, head_dim, torch.float32, "fp8", CPU)
    keys, values = cache.data[0, 0].view(torch.uint8), cache.data[0, 1].view(torch.uint8)
    for index, byte in enumerate(patterns):
        values[blocks[index // block_size], 0, index % block_size] = byte
    one = torch.tensor(1.0).to(FP8_DTYPE).view(torch.uint8)
    paged = PagedCPUBackend(cache, 1, torch.float32)
    plan = paged.plan([SequenceSpan(0, len(patterns) - 1, 1, blocks)])
    query = torch.zeros(1, 1, head_dim)
    query[0, 0, 0] = 100.0
    expected = torch.tensor(patterns, dtype=torch.uint8).view(FP8_DTYPE).float()
    for index in range(len(patterns)):
        keys.zero_()
        keys[blocks[index // block_size], 0, index % block_size, 0] = one
        got = paged.attend(query, query, query, cache, 0, plan, 1.0)
        assert torch.equal(got[0, 0], expected[index].expand(head_dim)), patterns[index]


def test_bfloat16_pool_and_queries_match_float32_reference():
    cache = filled_pool(64, 2, 8, 64, torch.bfloat16, "auto", seed=11)
    spans = spans_for(MIXED, 8, 64, seed=12)
    got, want = attend_both(cache, spans, 8, torch.bfloat16, seed=13)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)


def test_two_threads_give_the_same_result():
    cache = filled_pool(64, 4, 8, 64, torch.float32, "auto", seed=14)
    spans = spans_for(MIXED, 8, 64, seed=15)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = attend_both(cache, spans, 8, torch.float32, seed=16)
        torch.set_num_threads(2)
        two, _ = attend_both(cache, spans, 8, torch.float32, seed=16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_auto_falls_back_to_reference_where_the_kernel_cannot_serve():
    cache = KVCache(1, 4, 1, 4, 512, torch.float32, "auto", CPU)  # head_dim above 256
    backend = make_backend("auto", cache, 1, torch.float32, CPU)
    assert backend.name == "reference"
    with pytest.raises(ValueError, match="head_dim above 256"):
        make_backend("paged", cache, 1, torch.float32, CPU)
    assert make_backend("paged", KVCache(1, 4, 1, 4, 64, torch.float32, "auto", CPU), 1,
                        torch.float32, CPU).name == "paged-cpu"
