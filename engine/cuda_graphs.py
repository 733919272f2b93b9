"""Decode under CUDA graphs, one graph per batch-size bucket (nano-vllm's approach).

A decode step's kernels are small and many, so on a GPU launching them costs more than
running them. The forward pass of a decode-only batch is recorded once per bucket size into
a CUDA graph over static buffers (token ids, positions, write slots, the Triton attention
plan); a step copies its batch into the buffers, pads it to the next bucket and replays.
Padding rows attend to nothing (0 visible keys) and write their K/V into one scratch block
past the end of the pool, which the block manager never hands out.

``DecodeBuffers`` is the static-buffer path without the graph: the same computation run
eagerly, which is how the tests check the buffer and padding logic on the CPU.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention.base import AttentionMetadata
from engine.attention.paged_triton import PagedTritonBackend, TritonPlan
from engine.kv_cache import KVCache
from engine.model import CausalLM

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The bucket sizes for batches of up to ``max_batch`` (the largest is max_batch)."""
    return tuple(b for b in BUCKETS if b < max_batch) + (max_batch,)


class DecodeBuffers:
    """Static inputs of a decode step, padded to a bucket; ``forward`` runs eagerly."""

    def __init__(self, model: CausalLM, cache: KVCache, backend: PagedTritonBackend,
                 max_batch: int, max_blocks: int, scratch_block: int):
        device = cache.data.device
        self.model, self.cache, self.backend = model, cache, backend
        self.buckets = buckets_up_to(max_batch)
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        size = self.buckets[-1]

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids, self.positions = zeros(size), zeros(size)
        self.write_block_ids, self.write_offsets = zeros(size), zeros(size)
        self.visible = zeros(size, dtype=torch.int32)
        self.table_rows = torch.arange(size, dtype=torch.int32, device=device)
        self.tables = zeros(size, max_blocks, dtype=torch.int32)

    def bucket(self, batch: int, widest_table: int) -> int | None:
        """The bucket a decode batch runs in, or None if it does not fit the buffers."""
        if widest_table > self.max_blocks:
            return None
        return next((b for b in self.buckets if b >= batch), None)

    def fill(self, token_ids: list[int], positions: list[int], tables: list[list[int]],
             bucket: int) -> None:
        """Copy a batch of ``len(token_ids)`` decodes into the buffers, padded to ``bucket``."""
        batch, block_size = len(token_ids), self.cache.block_size
        padding = bucket - batch
        blocks = [t[p // block_size] for t, p in zip(tables, positions, strict=True)]
        width = max(len(t) for t in tables)
        host = {
            "input_ids": token_ids + [0] * padding,
            "positions": positions + [0] * padding,
            "write_block_ids": blocks + [self.scratch_block] * padding,
            "write_offsets": [p % block_size for p in positions] + [0] * padding,
            "visible": [p + 1 for p in positions] + [0] * padding,
        }
        for name, values in host.items():
            buffer = getattr(self, name)
            buffer[:bucket].copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        self.tables[:batch, :width].copy_(table, non_blocking=True)

    def metadata(self, bucket: int) -> AttentionMetadata:
        plan = TritonPlan(self.visible[:bucket], self.table_rows[:bucket], self.tables[:bucket],
                          fresh=[])
        return AttentionMetadata(self.write_block_ids[:bucket], self.write_offsets[:bucket],
                                 self.backend, plan)

    def forward(self, bucket: int) -> torch.Tensor:
        """Hidden states ``[bucket, hidden]`` of the filled batch (rows past it are padding)."""
        return self.model(self.input_ids[:bucket], self.positions[:bucket], self.cache,
                          self.metadata(bucket))


class DecodeGraphs(DecodeBuffers):
    """``DecodeBuffers`` with each bucket's forward pass recorded as a CUDA graph."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        started = time.perf_counter()
        pool = None
        # Largest first, so the smaller graphs reuse the largest one's memory pool.
        for bucket in reversed(self.buckets):
            self.visible[:bucket].zero_()  # record over padding only: no real KV is touched
            self.write_block_ids[:bucket].fill_(self.scratch_block)
            super().forward(bucket)  # warm-up: lazy init and Triton compilation happen here
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = super().forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.graphs),
                    ",".join(map(str, self.buckets)), time.perf_counter() - started)

    def forward(self, bucket: int) -> torch.Tensor:
        self.graphs[bucket].replay()
        return self.outputs[bucket]
