"""``linear(x, weight, bias)``: F.linear, or the small-GEMM CPU kernel for a few rows.

Decode runs linear layers on a handful of rows, where a layer is a stream over its weights;
BLAS GEMV streams them slower than the CPU's memory allows, so on the CPU up to
``SMALL_ROWS`` rows go to ``engine/cpu_kernels/small_gemm.cpp``. Everything else, and
everything where the kernels cannot be built, is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.cpu_kernels import KernelUnavailable, load

SMALL_ROWS = 8
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_gemm = None
_tried = False


def _small_gemm():
    global _gemm, _tried
    if not _tried:
        _tried = True
        try:
            _gemm = load().pdserve_small_gemm
        except KernelUnavailable:
            _gemm = None  # the attention backend logs why; F.linear serves
    return _gemm


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T + bias`` -> ``[M, N]``."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= SMALL_ROWS
            and x.dtype == weight.dtype and x.dtype in _DTYPES and weight.is_contiguous()):
        gemm = _small_gemm()
        if gemm is not None and x.shape[0] > 0:
            x = x.contiguous()
            out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
            code = _DTYPES[x.dtype]
            gemm(code, code, x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0],
                 weight.shape[0], weight.shape[1], torch.get_num_threads())
            return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)
