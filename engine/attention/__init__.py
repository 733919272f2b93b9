"""Attention backends over the paged KV pool, behind one interface (``base.py``).

- ``reference``: gather each request's blocks into a copy, then SDPA. Any device; the
  backend the tests hold the others to.
- ``paged``: read the blocks in place through block tables. On the CPU, a C++ kernel built on
  first use (``paged_cpu.py``); on CUDA, a Triton kernel (``paged_triton.py``), which also
  runs under CUDA graphs.

``auto`` picks ``paged`` where it runs and falls back to ``reference`` with a warning that
says why.
"""

from __future__ import annotations

import logging

import torch

from engine.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    SequenceSpan,
    paged_attention,
)
from engine.attention.paged_cpu import PagedCPUBackend
from engine.attention.paged_triton import PagedTritonBackend, unavailable
from engine.attention.reference import ReferenceBackend
from engine.cpu_kernels import KernelUnavailable
from engine.kv_cache import KVCache

__all__ = ["AttentionBackend", "AttentionMetadata", "SequenceSpan", "make_backend",
           "paged_attention"]

logger = logging.getLogger(__name__)


def make_backend(name: str, cache: KVCache, num_heads: int, dtype: torch.dtype,
                 device: torch.device) -> AttentionBackend:
    """The backend ``name`` (``auto``, ``reference`` or ``paged``) for this pool and model;
    ``num_heads`` are this rank's query heads."""
    if name == "reference":
        return ReferenceBackend(cache, device)
    if device.type == "cuda":
        reason = unavailable(cache, num_heads)
        if reason is None:
            return PagedTritonBackend(cache, num_heads, device)
        if name == "paged":
            raise ValueError(f"attention_backend='paged' is unavailable: {reason}")
        logger.warning("attention: the reference backend runs, the Triton kernel does not "
                       "take %s", reason)
        return ReferenceBackend(cache, device)
    if device.type != "cpu":
        if name == "paged":
            raise ValueError(f"attention_backend='paged' has no kernel for {device.type}; "
                             "use 'auto' or 'reference'")
        return ReferenceBackend(cache, device)
    try:
        return PagedCPUBackend(cache, num_heads, dtype)
    except KernelUnavailable as error:
        if name == "paged":
            raise ValueError(f"attention_backend='paged' is unavailable: {error}") from error
        logger.warning("attention: the reference backend runs, %s", error)
        return ReferenceBackend(cache, device)
