"""The element-wise CPU kernels (engine/ops.py) against the same arithmetic in eager torch."""

from __future__ import annotations

import pytest
import torch

from engine.config import RopeConfig
from engine.ops import (
    rms_norm,
    rms_norm_torch,
    rotary_torch,
    rotate_qk_,
    silu_mul,
    silu_mul_torch,
)
from engine.rotary import RotaryEmbedding

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5),
             torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch(dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 96, generator=generator).to(dtype)
    weight = torch.randn(96, generator=generator).to(dtype)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6),
                               **TOLERANCE[dtype])
    rows = torch.randn(7, 200, generator=generator).to(dtype)[:, 10:106]  # strided rows
    torch.testing.assert_close(rms_norm(rows, weight, 1e-5), rms_norm_torch(rows, weight, 1e-5),
                               **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [RopeConfig(theta=10000.0),
                                  RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0)])
def test_rotary_in_place_matches_torch(dtype, rope):
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    table = RotaryEmbedding(rope, head_dim, 300)
    generator = torch.Generator().manual_seed(2)
    qkv = torch.randn(5, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator)
    qkv = qkv.to(dtype)
    positions = torch.tensor([0, 1, 17, 150, 299])
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q0, k0, v0 = qkv.clone().split([q_size, kv_size, kv_size], dim=-1)
    want_q = rotary_torch(q0.float().reshape(5, num_heads, head_dim), positions, table.cos,
                          table.sin)
    want_k = rotary_torch(k0.float().reshape(5, num_kv_heads, head_dim), positions, table.cos,
                          table.sin)
    q, k, v = rotate_qk_(qkv, positions, num_heads, num_kv_heads, head_dim, table.cos,
                         table.sin)
    torch.testing.assert_close(q.float(), want_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k.float(), want_k, **TOLERANCE[dtype])
    assert torch.equal(v, v0.reshape(5, num_kv_heads, head_dim))  # v is not rotated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    generator = torch.Generator().manual_seed(3)
    gate_up = torch.randn(6, 2 * 80, generator=generator) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -1e4, 1e4])  # far tails: no overflow
    gate_up = gate_up.to(dtype)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_torch(gate_up), **TOLERANCE[dtype])
