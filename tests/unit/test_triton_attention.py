"""The Triton attention kernel (the CUDA backend) against the reference, on the CPU through
Triton's interpreter. Skipped where triton is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# Runs in a child: TRITON_INTERPRET must be set before triton compiles the kernel.
CHECK = r"""
import torch
from engine.attention.paged_triton import PagedTritonBackend
from tests.unit.test_attention_backends import MIXED, attend_both, filled_pool, spans_for
import tests.unit.test_attention_backends as cases

cases.PagedCPUBackend = lambda cache, heads, dtype: PagedTritonBackend(cache, heads,
                                                                       torch.device("cpu"))
for heads, kv_heads, head_dim, kv_dtype, dtype in [
        (8, 2, 16, "auto", torch.float32), (4, 4, 32, "auto", torch.float32),
        (8, 1, 16, "fp8", torch.float32), (6, 2, 16, "auto", torch.float32),
        (4, 2, 16, "auto", torch.bfloat16)]:
    cache = filled_pool(48, kv_heads, 4, head_dim, dtype, kv_dtype, seed=heads)
    spans = spans_for([(1, 1), (6, 1), (17, 1), (11, 3), (9, 9)], 4, 48, seed=kv_heads)
    got, want = attend_both(cache, spans, heads, dtype, seed=head_dim)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
print("ok")
"""


def test_triton_kernel_matches_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-3000:] + result.stderr[-3000:])
