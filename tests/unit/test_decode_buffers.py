"""The decode graphs' static-buffer path (engine/cuda_graphs.py), run eagerly on the CPU with
the Triton kernel in Triton's interpreter: the same logits as the plain path, with batches
padded to a bucket (padding rows write only the scratch block) and a batch too wide for the
buffers falling back. Skipped where triton is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import sys
import torch
from engine.attention.paged_triton import PagedTritonBackend
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeBuffers
from engine.model_runner import ModelInput, ModelRunner, RunnerOptions, SequenceInput
from engine.parallel import TensorParallel

model_dir = sys.argv[1]
config = ModelConfig.from_dir(model_dir)
options = RunnerOptions(model_dir, config, "float32", "cpu", 64, 4, "auto", 128, "reference")
plain = ModelRunner(options, TensorParallel())
static = ModelRunner(options, TensorParallel())
backend = PagedTritonBackend(static.kv_cache, config.num_heads, torch.device("cpu"))
static.attention = backend
static.decode_graphs = DecodeBuffers(static.model, static.kv_cache, backend, max_batch=4,
                                     max_blocks=6, scratch_block=63)
scratch = static.kv_cache.data[:, :, 63].clone()
generator = torch.Generator().manual_seed(0)
prompts = [torch.randint(8, 400, (n,), generator=generator).tolist() for n in (5, 9, 14)]
tables = [list(range(1, 9)), list(range(9, 17)), list(range(17, 25))]
batch = ModelInput([SequenceInput(p, 0, t, True) for p, t in zip(prompts, tables)])
want, got = plain.execute(batch), static.execute(batch)
torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
lengths = [len(p) for p in prompts]
tokens = want.argmax(-1).tolist()
for step in range(12):  # 3 rows in a bucket of 4; the longest grows past 6 blocks of 4
    batch = ModelInput([SequenceInput([tok], n, t, True)
                        for tok, n, t in zip(tokens, lengths, tables)])
    in_buffers = static._decode_in_buffers(batch) is not None
    assert in_buffers == (max(lengths) < 24), (step, lengths)
    want, got = plain.execute(batch), static.execute(batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    tokens = want.argmax(-1).tolist()
    lengths = [n + 1 for n in lengths]
assert not torch.equal(static.kv_cache.data[:, :, 63], scratch)  # padding wrote there only
torch.testing.assert_close(static.kv_cache.data[:, :, :63], plain.kv_cache.data[:, :, :63],
                           atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_static_decode_buffers_match_the_plain_path(tiny_llama_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CHECK, str(tiny_llama_dir)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-3000:] + result.stderr[-3000:])
