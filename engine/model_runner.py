"""Turns a scheduled batch into tensors, runs the model, returns the logits to sample.

It makes no policy decision. Its input (``ModelInput``) is plain Python so the driver rank
can broadcast it to the other tensor-parallel ranks as is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention import AttentionMetadata, SequenceSpan, make_backend
from engine.attention.paged_triton import PagedTritonBackend
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeBuffers, DecodeGraphs
from engine.kv_cache import KVCache
from engine.model import CausalLM
from engine.parallel import TensorParallel, local_kv_heads
from engine.quantization import enable_fast_paths
from engine.weights import load_weights
from pdserve.quant_config import QuantScheme

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SequenceInput:
    """Compute ``token_ids`` at positions ``start...``; ``block_ids`` cover them all."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    needs_logits: bool


@dataclass(slots=True)
class ModelInput:
    """One step's batch in plain Python (no tensors), so the driver rank can broadcast it
    to the other tensor-parallel ranks as is."""

    sequences: list[SequenceInput]


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    """What a rank needs to build its model and pool; identical on every rank."""

    model_dir: str
    model: ModelConfig
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    kv_cache_dtype: str
    max_model_len: int
    attention_backend: str = "auto"
    enforce_eager: bool = False  # CUDA: no decode graphs
    max_num_seqs: int = 256  # the largest decode graph
    quant: QuantScheme | None = None  # weight quantization (None: full precision)


class ModelRunner:
    """One tensor-parallel rank's model and KV pool."""

    def __init__(self, options: RunnerOptions, tp: TensorParallel):
        self.options = options
        self.tp = tp
        self.device = torch.device(options.device)
        self.dtype = getattr(torch, options.dtype)
        self.config = options.model
        with torch.device(self.device):
            self.model = CausalLM(self.config, tp, self.dtype, options.max_model_len,
                                  options.quant)
        load_weights(self.model, Path(options.model_dir))
        if options.quant is not None:
            path = enable_fast_paths(self.model, self.device, self.dtype)
            if tp.rank == 0:
                logger.info("weights: %s; compute: %s", options.quant.describe(), path)
        _, num_kv_heads = local_kv_heads(self.config.num_kv_heads, tp)
        graphs = self.device.type == "cuda" and not options.enforce_eager
        # Decode graphs write their padding rows' K/V into one block past the pool's end.
        self.kv_cache = KVCache(self.config.num_layers, options.num_blocks + int(graphs),
                                num_kv_heads, options.block_size, self.config.head_dim,
                                self.dtype, options.kv_cache_dtype, self.device)
        self.attention = make_backend(options.attention_backend, self.kv_cache,
                                      self.config.num_heads // tp.size, self.dtype, self.device)
        if tp.rank == 0:
            logger.info("attention backend: %s (%s, %s pool)", self.attention.name,
                        options.dtype, options.kv_cache_dtype)
        self.decode_graphs: DecodeBuffers | None = None
        if graphs and isinstance(self.attention, PagedTritonBackend):
            max_blocks = -(-options.max_model_len // options.block_size)
            self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, self.attention,
                                              options.max_num_seqs, max_blocks,
                                              scratch_block=options.num_blocks)

    @torch.inference_mode()
    def execute(self, batch: ModelInput,
                after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits ``[S, vocab]`` (float32) for the sequences with ``needs_logits``, in order;
        ``after_layer`` as in ``CausalLM.forward``."""
        hidden = self._decode_in_buffers(batch) if after_layer is None else None
        if hidden is not None:
            logit_rows = self._tensor([i for i, seq in enumerate(batch.sequences)
                                       if seq.needs_logits])
        else:
            input_ids, positions, meta, logit_rows = self._prepare(batch)
            hidden = self.model(input_ids, positions, self.kv_cache, meta, after_layer)
        return self.model.compute_logits(hidden[logit_rows])

    def _decode_in_buffers(self, batch: ModelInput) -> torch.Tensor | None:
        """A decode-only batch through the static buffers (a CUDA graph's replay), in batch
        order; None when the batch is not decode-only or does not fit them."""
        buffers, sequences = self.decode_graphs, batch.sequences
        if buffers is None or not sequences or any(len(s.token_ids) != 1 for s in sequences):
            return None
        block_size = self.options.block_size
        tables = [s.block_ids[: s.start // block_size + 1] for s in sequences]
        bucket = buffers.bucket(len(sequences), max(len(t) for t in tables))
        if bucket is None:
            return None
        buffers.fill([s.token_ids[0] for s in sequences], [s.start for s in sequences], tables,
                     bucket)
        return buffers.forward(bucket)[: len(sequences)]

    def _prepare(self, batch: ModelInput):
        # Decodes (one query token) first, shortest context first, then prefill chunks: the
        # reference backend batches adjacent decodes of similar length.
        order = sorted(range(len(batch.sequences)), key=lambda i: (
            len(batch.sequences[i].token_ids) != 1, batch.sequences[i].start))
        block_size = self.options.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[SequenceSpan] = []
        last_row: dict[int, int] = {}
        for index in order:
            seq = batch.sequences[index]
            row, count = len(token_ids), len(seq.token_ids)
            token_ids += seq.token_ids
            seq_positions = range(seq.start, seq.start + count)
            positions += seq_positions
            slots += [seq.block_ids[p // block_size] * block_size + p % block_size
                      for p in seq_positions]
            table = seq.block_ids[: -(-(seq.start + count) // block_size)]
            spans.append(SequenceSpan(row, seq.start, count, table))
            last_row[index] = row + count - 1
        slot_tensor = self._tensor(slots)
        meta = AttentionMetadata(
            write_block_ids=slot_tensor // block_size,
            write_offsets=slot_tensor % block_size,
            backend=self.attention,
            plan=self.attention.plan(spans),
        )
        logit_rows = [last_row[i] for i, seq in enumerate(batch.sequences) if seq.needs_logits]
        return (self._tensor(token_ids), self._tensor(positions), meta,
                self._tensor(logit_rows))

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
