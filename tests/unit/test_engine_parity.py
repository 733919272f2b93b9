"""Greedy output of the engine equals HF transformers token for token, logits within 1e-3."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.unit.engine_oracle import hf_greedy, random_prompts, top1_margin

NUM_NEW_TOKENS = 32
LOGITS_ATOL = 1e-3
# The test models are built with peaked logits (pdserve/modelgen.py). A top-1 margin over
# twice the logits tolerance means logits within tolerance cannot pick another token, so a
# token mismatch is a real bug, never fp32 summation order.
MIN_TOP1_MARGIN = 2 * LOGITS_ATOL
MIN_DISTINCT_TOKENS = 6
GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0, ignore_eos=True,
                        output_logits=True)


@pytest.fixture(params=["reference", "paged"])
def backend(request):
    """Every parity test runs on both attention backends: each must match HF on its own."""
    return request.param


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    return str(tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir)


def assert_matches_hf(model_dir: str, prompts: list[list[int]], outputs) -> None:
    assert len(outputs) == len(prompts)
    for prompt, output in zip(prompts, outputs, strict=True):
        ref_tokens, ref_logits = hf_greedy(model_dir, prompt, NUM_NEW_TOKENS)
        assert top1_margin(ref_logits) > MIN_TOP1_MARGIN
        assert len(set(ref_tokens)) >= MIN_DISTINCT_TOKENS
        assert output.token_ids == ref_tokens
        logits = torch.stack(output.logits)
        assert logits.shape == ref_logits.shape
        torch.testing.assert_close(logits, ref_logits, atol=LOGITS_ATOL, rtol=0)


def generate(model_dir, prompts, backend, **options):
    with LLM(model_dir, attention_backend=backend, **options) as llm:
        outputs = llm.generate(prompts, GREEDY)
        return outputs, llm.engine


def test_single_request(model_dir, backend):
    prompts = random_prompts([21], 400)
    outputs, _ = generate(model_dir, prompts, backend, num_blocks=32, block_size=4)
    assert_matches_hf(model_dir, prompts, outputs)


def test_batch_of_different_lengths(model_dir, backend):
    prompts = random_prompts([3, 17, 40, 9, 64], 400, seed=1)
    outputs, engine = generate(model_dir, prompts, backend, num_blocks=128, block_size=8)
    assert_matches_hf(model_dir, prompts, outputs)
    assert engine.block_manager.num_free_blocks == 128


def test_chunked_prefill_forced_small(model_dir, backend):
    prompts = random_prompts([30, 45], 400, seed=2)
    outputs, _ = generate(model_dir, prompts, backend, num_blocks=64, block_size=4,
                          max_num_batched_tokens=7)
    assert_matches_hf(model_dir, prompts, outputs)


def test_prefix_cache_hit(model_dir, backend):
    (shared,) = random_prompts([40], 400, seed=3)
    prompts = [shared + [11, 12, 13], shared + [21, 22]]
    with LLM(model_dir, num_blocks=64, block_size=8, attention_backend=backend) as llm:
        first = llm.generate([prompts[0]], GREEDY)
        second = llm.generate([prompts[1]], GREEDY)
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens == 40
    assert_matches_hf(model_dir, prompts, first + second)


def test_under_preemption(model_dir, backend):
    prompts = random_prompts([20, 28, 24, 16], 400, seed=4)
    # 24 blocks of 4 tokens cannot hold four requests growing to 52-60 tokens at once.
    outputs, engine = generate(model_dir, prompts, backend, num_blocks=24, block_size=4,
                               max_model_len=96)
    assert engine.scheduler.num_preemptions > 0
    assert_matches_hf(model_dir, prompts, outputs)
    assert engine.block_manager.num_free_blocks == 24


def test_tensor_parallel_2(tiny_llama_dir, backend):
    prompts = random_prompts([5, 33], 400, seed=5)
    outputs, _ = generate(str(tiny_llama_dir), prompts, backend, num_blocks=32, block_size=8,
                          tensor_parallel_size=2)
    assert_matches_hf(str(tiny_llama_dir), prompts, outputs)


def test_more_decodes_than_one_attention_group(tiny_llama_dir, backend):
    from engine.attention.reference import DECODE_GROUP_SIZE

    prompts = random_prompts(list(range(3, 3 + 2 * (DECODE_GROUP_SIZE + 2), 2)), 400, seed=6)
    outputs, _ = generate(str(tiny_llama_dir), prompts, backend, num_blocks=256, block_size=4)
    assert_matches_hf(str(tiny_llama_dir), prompts, outputs)
