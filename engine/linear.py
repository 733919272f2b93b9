"""``linear(x, weight, bias)``: the fastest GEMM this device has for the shape.

On the CPU, up to ``SMALL_ROWS`` rows (decode) go to ``engine/cpu_kernels/small_gemm.cpp``:
a layer is then a stream over its weights, and BLAS GEMV streams them slower than memory
allows. Everything else, and everywhere the kernels cannot be built, is F.linear.

Not used, by measurement: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``) ran about
10% faster than F.linear at 32 to 256 rows in float32, but it caches a primitive per distinct
row count, and a server sees every count: the decode worker's resident memory grew by 45 MiB
over 1,000 requests (tests/e2e/test_cluster.py caught it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.cpu_kernels import library_or_none

SMALL_ROWS = 8
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _small_gemm():
    library = library_or_none()
    return None if library is None else library.pdserve_small_gemm


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
