"""``linear(x, weight, bias)``: the fastest GEMM this device has for the shape.

On the CPU, up to ``SMALL_ROWS`` rows (decode) go to ``engine/cpu_kernels/small_gemm.cpp``:
a layer is then a stream over its weights, and BLAS GEMV streams them slower than memory
allows. Everything else, and everywhere the kernels cannot be built, is F.linear.

bfloat16 F.linear on the CPU is oneDNN, which caches a primitive, with its own copy of the
reordered weights, for every distinct row count: over 2,040 row counts one 2816 x 512 layer
grew the process by 2.8 GiB (the cache holds 1,024). So bf16 rows are padded up to one of a
few bucket sizes (``row_bucket``: at most a quarter more rows), which bounds the cache to a
few dozen entries per layer shape. float32 F.linear is MKL, which keeps no
such cache.

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


_PADDED_DTYPES = (torch.bfloat16, torch.float16)


def row_bucket(rows: int) -> int:
    """The row count a GEMM of ``rows`` rows runs at: rows rounded up to a multiple of a
    quarter of their highest power of two, so at most a quarter more, and four sizes per
    doubling (36 sizes from 9 to 2,048 rows)."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


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
    if x.device.type == "cpu" and x.dim() == 2 and x.dtype in _PADDED_DTYPES:
        rows = x.shape[0]
        padded_rows = row_bucket(rows)
        if padded_rows != rows:
            padded = x.new_zeros(padded_rows, x.shape[1])
            padded[:rows] = x
            return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)
