"""fp8 KV cache: close to the full-precision run, measured, not equal."""

from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from engine.kv_cache import FP8_MAX, dequantize_fp8, quantize_fp8
from tests.unit.engine_oracle import hf_logits_along, random_prompts

# e4m3 keeps 3 mantissa bits: a per-element relative rounding error of at most 2^-4.
FP8_RELATIVE_STEP = 2.0**-4
MIN_LOGITS_COSINE = 0.99


def test_quantize_round_trip_error_is_bounded_per_row():
    x = torch.randn(64, 4, 16) * torch.logspace(-3, 3, 64)[:, None, None]
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 4)
    error = (dequantize_fp8(q, scale, torch.float32) - x).abs()
    row_max = x.abs().amax(-1, keepdim=True)
    # Scaled to [-448, 448], a normal value rounds to within half a step, 2^-4 of itself;
    # a subnormal one (below 2^-6) to within 2^-10. Back in x units, times the scale.
    bound = torch.maximum(x.abs() * FP8_RELATIVE_STEP, row_max / FP8_MAX * 2.0**-10)
    assert bool((error <= bound * (1 + 1e-5)).all())


def test_zero_rows_do_not_divide_by_zero():
    q, scale = quantize_fp8(torch.zeros(2, 3, 8))
    assert torch.equal(dequantize_fp8(q, scale, torch.float32), torch.zeros(2, 3, 8))


def test_fp8_logits_stay_close_to_full_precision(tiny_llama_dir):
    model_dir = str(tiny_llama_dir)
    prompts = random_prompts([12, 37], 400, seed=9)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, output_logits=True)
    with LLM(model_dir, num_blocks=32, block_size=8, kv_cache_dtype="fp8") as llm:
        assert llm.engine.executor.runner.kv_cache.data.dtype == torch.float8_e4m3fn
        outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        # Same history for both: HF (full precision) fed the tokens the fp8 run produced.
        reference = hf_logits_along(model_dir, prompt, output.token_ids)
        cosine = torch.nn.functional.cosine_similarity(torch.stack(output.logits), reference)
        assert float(cosine.min()) > MIN_LOGITS_COSINE


def test_pool_sizing_counts_exactly_what_the_pool_allocates():
    from engine.kv_cache import KVCache, bytes_per_block

    for kv_cache_dtype in ("auto", "fp8"):
        cache = KVCache(3, 5, 2, 4, 16, torch.float32, kv_cache_dtype, "cpu")
        allocated = cache.data.numel() * cache.data.element_size()
        if cache.scales is not None:
            allocated += cache.scales.numel() * cache.scales.element_size()
        assert allocated == 5 * bytes_per_block(3, 2, 4, 16, torch.float32, kv_cache_dtype)


def test_dequantize_fp8_gives_torchs_conversion_for_every_bit_pattern():
    import torch

    from engine.kv_cache import FP8_DTYPE, dequantize_fp8

    patterns = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).view(2, 128)
    scale = torch.tensor([0.5, 3.0])
    expected = patterns.float() * scale.unsqueeze(-1)
    got = dequantize_fp8(patterns, scale, torch.float32)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
