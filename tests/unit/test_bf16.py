"""bfloat16 on the CPU: close to the float32 oracle, on both attention backends.

Teacher-forced: HF in float32 is fed the history bf16 produced, so every position compares
the two on the same prefix. bf16 keeps 8 bits of mantissa, so logits agree to a cosine of
about 0.9998 and the argmax to about 93-95% of positions on the tiny random model (whose
logits are chaotic; docs/benchmarks.md gives the figures on the small model).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.unit.engine_oracle import hf_logits_along, random_prompts

MIN_COSINE, MIN_MEAN_COSINE, MIN_AGREEMENT = 0.998, 0.9995, 0.85


@pytest.mark.parametrize("backend", ["reference", "paged"])
def test_bfloat16_logits_and_greedy_tokens_stay_close_to_float32(tiny_llama_dir, backend):
    model_dir = str(tiny_llama_dir)
    prompts = random_prompts([5, 17, 40], 400, seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, output_logits=True)
    with LLM(model_dir, dtype="bfloat16", num_blocks=128, block_size=8,
             attention_backend=backend) as llm:
        outputs = llm.generate(prompts, params)
    cosines, agree = [], []
    for prompt, output in zip(prompts, outputs, strict=True):
        reference = hf_logits_along(model_dir, prompt, output.token_ids)
        logits = torch.stack(output.logits)
        cosines += torch.nn.functional.cosine_similarity(logits, reference, dim=-1).tolist()
        agree += (reference.argmax(-1) == torch.tensor(output.token_ids)).tolist()
    assert min(cosines) > MIN_COSINE, min(cosines)
    assert sum(cosines) / len(cosines) > MIN_MEAN_COSINE
    assert sum(agree) / len(agree) >= MIN_AGREEMENT, sum(agree) / len(agree)
