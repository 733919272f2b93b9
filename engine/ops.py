"""The decoder's element-wise ops: RMSNorm, rotary embedding, SiLU(gate) x up.

On the CPU, in float32 or bfloat16, each is one call into ``engine/cpu_kernels/
elementwise.cpp`` (one pass over the rows, no intermediate tensors); anywhere else, and where
the kernels cannot be built, the same arithmetic in eager torch (``*_torch``), which the
tests hold the kernels to.
"""

from __future__ import annotations

import torch

from engine.cpu_kernels import library_or_none

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _kernels(x: torch.Tensor):
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    return library_or_none()


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, as the reference implementation does.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``[T, size]`` -> ``[T, size]``."""
    library = _kernels(x)
    if library is None or x.dim() != 2 or x.stride(1) != 1 or weight.dtype != x.dtype:
        return rms_norm_torch(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype)
    library.pdserve_rms_norm(_DTYPES[x.dtype], x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                             x.shape[0], x.shape[1], x.stride(0), eps)
    return out


def rotary_torch(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """x ``[T, H, D]`` rotated by each token's position (rotate-half form)."""
    cos = cos[positions].unsqueeze(1).to(x.dtype)  # [T, 1, D]
    sin = sin[positions].unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_qk_(qkv: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused ``[T, (Hq + 2 Hkv) D]`` projection into q ``[T, Hq, D]``, k and v
    ``[T, Hkv, D]``, with q and k rotated by position (in place where the kernel runs)."""
    tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    library = _kernels(qkv)
    if library is not None and qkv.is_contiguous() and positions.dtype == torch.int64:
        library.pdserve_rotary(_DTYPES[qkv.dtype], qkv.data_ptr(), tokens, qkv.shape[1],
                               num_heads + num_kv_heads, head_dim, positions.data_ptr(),
                               cos.data_ptr(), sin.data_ptr())
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (q.reshape(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim),
                v.view(tokens, num_kv_heads, head_dim))
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = rotary_torch(q.view(tokens, num_heads, head_dim), positions, cos, sin)
    k = rotary_torch(k.view(tokens, num_kv_heads, head_dim), positions, cos, sin)
    return q, k, v.view(tokens, num_kv_heads, head_dim)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[T, 2I]`` (gate then up) -> ``silu(gate) * up`` ``[T, I]``."""
    library = _kernels(gate_up)
    if library is None or not gate_up.is_contiguous():
        return silu_mul_torch(gate_up)
    rows, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, size, dtype=gate_up.dtype)
    library.pdserve_silu_mul(_DTYPES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), rows,
                             size)
    return out
